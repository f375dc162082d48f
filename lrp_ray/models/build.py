"""Building DETR from a config and loading it with weights."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .backbone import Joiner, MaskedBackbone, build_resnet
from .checkpoint import infer_config_overrides, load_weights, read_state_dict
from .config import DetrConfig, load_config
from .detr import DETR
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["build_model", "load_model", "DEMO_DIR", "DEMO_OVERRIDES", "demo_config"]

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"

# Tiny stand-in used when no trained demo model is bundled (same shape as tests' d2-small, narrower ResNet).
DEMO_OVERRIDES: dict[str, object] = {
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 16,
    "MODEL.DETR.HIDDEN_DIM": 64,
    "MODEL.DETR.NHEADS": 4,
    "MODEL.DETR.DIM_FEEDFORWARD": 256,
    "MODEL.DETR.ENC_LAYERS": 3,
    "MODEL.DETR.DEC_LAYERS": 3,
    "MODEL.DETR.NUM_OBJECT_QUERIES": 20,
    "MODEL.DETR.NUM_CLASSES": 5,
    "INPUT.MIN_SIZE_TEST": 320,
    "INPUT.MAX_SIZE_TEST": 512,
}

_warned_random_demo = False


def demo_config() -> DetrConfig:
    """Config of the random-weight stand-in demo model."""
    return DetrConfig().with_overrides(DEMO_OVERRIDES)


def build_model(cfg: DetrConfig) -> DETR:
    """A DETR with the architecture of ``cfg`` (random initialisation), in eval mode."""
    position = PositionEmbeddingSine(cfg.hidden_dim // 2, normalize=True)
    backbone = Joiner(MaskedBackbone(build_resnet(cfg)), position)
    transformer = Transformer(d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
                              num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
                              dropout=cfg.dropout, normalize_before=cfg.pre_norm,
                              return_intermediate_dec=True)
    model = DETR(backbone, transformer, num_classes=cfg.num_classes, num_queries=cfg.num_queries, cfg=cfg)
    return model.eval()


def _as_config(config: DetrConfig | str | Path | None, overrides: Sequence[str]) -> DetrConfig | None:
    if config is None:
        return None
    if isinstance(config, DetrConfig):
        return config.with_overrides(list(overrides)) if overrides else config
    return load_config(config, overrides)


def load_model(config: DetrConfig | str | Path | None = None, weights: str | Path | None = None,
               overrides: Sequence[str] = (), device: str | torch.device = "cpu") -> DETR:
    """Build DETR and load its weights; returns the model in eval mode on ``device``.

    - config and weights: build from the config, load the weights strictly.
    - weights only: the architecture is inferred from the checkpoint (``infer_config_overrides``); a
      detectron2 ``config.yaml`` next to the weights file is used for everything the weights cannot
      tell (heads, input format, sizes). Without it NHEADS stays 8: pass the config when in doubt.
    - config only: random weights (``torch.manual_seed(0)``).
    - neither: the bundled demo model (``lrp_ray/assets/demo``) if present, otherwise a tiny random
      stand-in (:func:`demo_config`) with a one-time warning.
    """
    global _warned_random_demo
    cfg = _as_config(config, overrides)
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        state, _ = read_state_dict(weights)
        if cfg is None:
            sibling = weights.parent / "config.yaml"
            base = load_config(sibling) if sibling.is_file() else DetrConfig()
            if sibling.is_file():
                log.info("using %s next to the weights for settings the checkpoint cannot tell", sibling)
            else:
                log.info("no config given: architecture inferred from %s (NHEADS %d assumed)",
                         weights, base.nheads)
            cfg = base.with_overrides(infer_config_overrides(state))
            if overrides:
                cfg = cfg.with_overrides(list(overrides))
        model = build_model(cfg)
        load_weights(model, state, source=str(weights))
        return model.to(device).eval()
    if cfg is None:
        demo_cfg, demo_weights = DEMO_DIR / "config.yaml", DEMO_DIR / "model_final.pth"
        if demo_cfg.is_file() and demo_weights.is_file():
            return load_model(demo_cfg, demo_weights, overrides, device)
        if not _warned_random_demo:
            warnings.warn("no trained demo weights are bundled (lrp_ray/assets/demo); using a tiny DETR "
                          "with random weights (seed 0)", UserWarning, stacklevel=2)
            _warned_random_demo = True
        cfg = demo_config()
        if overrides:
            cfg = cfg.with_overrides(list(overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg)
    return model.to(device).eval()
