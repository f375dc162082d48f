"""Finding the DETR inside an arbitrary module tree, by structure rather than by class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import image_sizes_from_mask

__all__ = ["DetrParts", "from_module", "DetrNotFoundError"]

EncoderInputs = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

_ENC_LAYER_ATTRS = ("self_attn", "linear1", "linear2", "norm1", "norm2")
_DEC_LAYER_ATTRS = ("self_attn", "multihead_attn", "linear1", "linear2", "norm1", "norm2", "norm3")


class DetrNotFoundError(ValueError):
    """No DETR-shaped submodule in the given model."""


@dataclass
class DetrParts:
    """The pieces of a DETR that the LRP engine works on (see docs/ARCHITECTURE.md)."""

    module: nn.Module
    transformer: nn.Module
    input_proj: nn.Module
    query_embed: nn.Embedding
    class_embed: nn.Module
    bbox_embed: nn.Module
    encoder_inputs: EncoderInputs
    hidden_dim: int
    nheads: int
    num_queries: int
    num_classes: int
    pre_norm: bool


def _transformer_problem(t: Any) -> str | None:
    """Why ``t`` is not a DETR transformer (None when it is one)."""
    for part, attrs in (("encoder", _ENC_LAYER_ATTRS), ("decoder", _DEC_LAYER_ATTRS)):
        sub = getattr(t, part, None)
        layers = getattr(sub, "layers", None)
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
            return f"transformer has no non-empty .{part}.layers"
        for i, layer in enumerate(layers):
            absent = [a for a in attrs if not isinstance(getattr(layer, a, None), nn.Module)]
            if absent:
                return f"transformer.{part}.layers[{i}] lacks {', '.join(absent)}"
        if not isinstance(layers[0].self_attn, nn.MultiheadAttention):
            return f"transformer.{part}.layers[0].self_attn is not nn.MultiheadAttention"
    return None


def _candidate_problem(m: nn.Module) -> str | None:
    absent = [a for a in ("transformer", "input_proj", "query_embed", "backbone", "class_embed", "bbox_embed")
              if not isinstance(getattr(m, a, None), nn.Module)]
    if absent:
        return "lacks " + ", ".join(absent)
    if not isinstance(m.query_embed, nn.Embedding):
        return "query_embed is not nn.Embedding"
    return _transformer_problem(m.transformer)


class _Batch:
    """Both input conventions at once: NestedTensor (``.tensors``/``.mask``/``.decompose()``) and
    detectron2 ImageList (``.tensor``/``.image_sizes``)."""

    def __init__(self, images: Tensor, mask: Tensor) -> None:
        self.tensors = self.tensor = images
        self.mask = mask
        self.image_sizes = image_sizes_from_mask(mask)

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device: Any) -> _Batch:
        return _Batch(self.tensors.to(device), self.mask.to(device))

    @property
    def device(self) -> torch.device:
        return self.tensors.device


def _last(x: Any) -> Any:
    if isinstance(x, dict):
        return list(x.values())[-1]
    if isinstance(x, (list, tuple)):
        return x[-1]
    return x


def _split_feature(f: Any) -> tuple[Tensor, Tensor]:
    if hasattr(f, "decompose"):
        return f.decompose()
    if hasattr(f, "tensors") and hasattr(f, "mask"):
        return f.tensors, f.mask
    if isinstance(f, (tuple, list)) and len(f) == 2:
        return f[0], f[1]
    raise TypeError(f"cannot read a (features, mask) pair from {type(f).__name__}")


def _reference_encoder_inputs(detr: nn.Module) -> EncoderInputs:
    """``features, pos = detr.backbone(batch)`` as DETR's reference code and detectron2 wrapper do."""

    def encoder_inputs(images: Tensor, pad_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = detr.backbone(_Batch(images, pad_mask.bool()))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{type(detr.backbone).__name__} returned {type(out).__name__}; expected "
                            "(features, pos) as DETR's Joiner")
        features, pos = out
        src, mask = _split_feature(_last(features))
        pos_t = _last(pos)
        return detr.input_proj(src), pos_t.to(src.dtype), mask.bool()

    return encoder_inputs


def from_module(model: nn.Module) -> DetrParts:
    """Find the DETR in ``model`` (itself or the shallowest submodule, e.g. ``wrapper.detr``).

    A DETR here is any module with ``transformer`` (``.encoder.layers`` with self_attn/linear1/linear2/
    norm1/norm2, ``.decoder.layers`` also with multihead_attn/norm3), ``input_proj``, ``query_embed``
    (nn.Embedding), ``backbone``, ``class_embed`` and ``bbox_embed``. Its ``encoder_inputs`` method is
    used when present; otherwise its backbone is called in the DETR-reference convention.
    """
    near: list[str] = []
    for name, m in model.named_modules():
        if not hasattr(m, "transformer") and not hasattr(m, "query_embed"):
            continue
        problem = _candidate_problem(m)
        if problem is None:
            return _parts(m)
        near.append(f"{name or '<root>'} ({type(m).__name__}): {problem}")
    detail = ("; candidates: " + "; ".join(near[:5])) if near else ""
    raise DetrNotFoundError(
        f"no DETR transformer found in {type(model).__name__}: looked for a module with transformer "
        "(.encoder.layers / .decoder.layers of DETR layers), input_proj, query_embed, backbone, class_embed, "
        f"bbox_embed{detail}")


def _parts(m: nn.Module) -> DetrParts:
    t = m.transformer
    enc0 = t.encoder.layers[0]
    own = getattr(m, "encoder_inputs", None)
    encoder_inputs = own if callable(own) else _reference_encoder_inputs(m)
    class_embed = m.class_embed
    out_features = getattr(class_embed, "out_features", None)
    if out_features is None:
        w = [p for p in class_embed.parameters() if p.dim() == 2]
        out_features = int(w[-1].shape[0]) if w else 0
    return DetrParts(
        module=m,
        transformer=t,
        input_proj=m.input_proj,
        query_embed=m.query_embed,
        class_embed=class_embed,
        bbox_embed=m.bbox_embed,
        encoder_inputs=encoder_inputs,
        hidden_dim=int(m.query_embed.embedding_dim),
        nheads=int(enc0.self_attn.num_heads),
        num_queries=int(m.query_embed.num_embeddings),
        num_classes=int(out_features) - 1,
        pre_norm=bool(getattr(enc0, "normalize_before", getattr(t.encoder, "norm", None) is not None)),
    )
