"""DETR in DETR-reference / detectron2 names: config, model, weights, pre/post-processing, locating.

Knows nothing of Ray or LRP.
"""

from .build import build_model, load_model
from .checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    LoadReport,
    infer_config_overrides,
    load_weights,
)
from .config import ConfigError, DetrConfig, load_config
from .detr import DETR
from .locate import DetrNotFoundError, DetrParts, from_module
from .postprocess import detections
from .preprocess import ImageBatch, ImageReadError, preprocess, read_image

__all__ = [
    "load_config", "DetrConfig", "ConfigError", "build_model", "load_model", "load_weights", "LoadReport",
    "infer_config_overrides", "read_image", "preprocess", "ImageBatch", "detections", "from_module",
    "DetrParts", "DetrNotFoundError", "CheckpointError", "CheckpointMismatchError", "ImageReadError", "DETR",
]
