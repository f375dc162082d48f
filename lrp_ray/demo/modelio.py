"""The demo's glue to the package's DETR: config file, model, training forward, detectron2 checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lrp_ray.models import DetrConfig, build_model, load_config, preprocess

from .scenes import Scene


def write_config(path: str | Path, overrides: Mapping[str, object]) -> DetrConfig:
    """Write the detectron2-style YAML of DETR's defaults + ``overrides``; return it as loaded back."""
    cfg = DetrConfig().with_overrides(dict(overrides))
    cfg.to_yaml(path)
    return load_config(path)


def build(cfg: DetrConfig) -> nn.Module:
    return build_model(cfg)


def forward_layers(model: nn.Module, cfg: DetrConfig,
                   scenes: Sequence[Scene]) -> tuple[list[Tensor], list[Tensor]]:
    """Training forward through ``preprocess`` + ``DETR.forward``: per decoder layer (logits, boxes)."""
    batch = preprocess([s.image for s in scenes], cfg)
    out = model(batch.tensor, batch.mask)
    aux = out.get("aux_outputs", [])
    logits = [a["pred_logits"] for a in aux] + [out["pred_logits"]]
    boxes = [a["pred_boxes"] for a in aux] + [out["pred_boxes"]]
    return logits, boxes


def save_detectron2(model: nn.Module, path: str | Path) -> int:
    """Save in detectron2's layout ``{"model": {"detr.<name>": tensor}}`` (fp32); returns the file size."""
    sd = {"detr." + k: v.detach().to(torch.float32).clone().contiguous()
          for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": sd}, tmp)
    tmp.replace(path)
    return path.stat().st_size
