"""The LRP engine: forward cache, rules and vectorised relevance propagation (no Ray, no files)."""

from .cache import ForwardCache
from .engine import MODULES, PRECISIONS, EngineConfig, LrpEngine, resolve_device
from .result import RelevanceResult
from .rules import RULE_SETS, RuleSet

__all__ = ["ForwardCache", "EngineConfig", "LrpEngine", "RelevanceResult", "RuleSet", "RULE_SETS",
           "MODULES", "PRECISIONS", "resolve_device"]
