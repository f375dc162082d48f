"""The LRP engine: forward cache, rules and vectorised relevance propagation (no Ray, no files)."""

from .cache import (
    AttentionRecord,
    DecoderLayerRecord,
    EncoderLayerRecord,
    FfnRecord,
    ForwardCache,
    NormRecord,
)
from .concepts import (
    MEMORY_BYPASS,
    OTHER_QUERIES,
    ConditionalMaps,
    DetectionRelevance,
    conditional_maps,
    detection_relevance,
    top_channels,
)
from .detections import DetectionSet, parse_selection, select_detections
from .engine import (
    MODULES,
    NUMERICS_VERSION,
    PRECISIONS,
    EngineConfig,
    LrpEngine,
    resolve_device,
)
from .result import RelevanceResult
from .rules import RULE_SETS, RULES, OpRules, RuleSet

__all__ = ["ForwardCache", "EngineConfig", "LrpEngine", "RelevanceResult", "RuleSet", "RULE_SETS", "RULES",
           "OpRules", "MODULES", "PRECISIONS", "NUMERICS_VERSION", "resolve_device", "AttentionRecord",
           "NormRecord", "FfnRecord", "EncoderLayerRecord", "DecoderLayerRecord", "DetectionSet",
           "parse_selection", "select_detections", "DetectionRelevance", "ConditionalMaps",
           "detection_relevance", "conditional_maps", "top_channels", "OTHER_QUERIES", "MEMORY_BYPASS"]
