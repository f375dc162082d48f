"""Loading DETR weights: detectron2 wrapper, original DETR and plain state-dict layouts.

Files are opened with ``torch.load(..., weights_only=True)``: a pickle holding arbitrary Python objects
is refused, never executed.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "LoadReport", "load_weights", "read_state_dict",
    "normalize_state_dict", "infer_config_overrides",
]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not hold DETR weights."""


class CheckpointMismatchError(CheckpointError):
    """Checkpoint keys or shapes do not fit the model."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
                 hints: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatch = shape_mismatch
        self.hints = hints


@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``layout``: "detectron2", "detr" (original) or "plain"."""

    source: str
    layout: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)


# Keys a checkpoint may carry that are not DETR weights (detectron2 wrapper's loss module).
_IGNORED_PREFIXES = ("criterion.",)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()
                       or "Unsupported operand" in ln), "")
        if not detail:  # not a pickle of Python objects at all (text, random bytes)
            raise CheckpointError(f"{path}: cannot read checkpoint: not a torch.save file, or corrupt "
                                  f"({' '.join(str(exc).split())[:200]})") from None
        detail = f" ({detail})"
        raise CheckpointError(
            f"{path}: not a plain-tensor checkpoint; it holds Python objects that "
            f"torch.load(weights_only=True) refused for safety{detail}. If you trust the file, "
            "re-save only its state dict, e.g. "
            "torch.save({'model': state_dict}, 'clean.pth').") from None
    except Exception as exc:  # torch raises many types for non-checkpoint bytes
        msg = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint: not a torch.save file, or corrupt "
                              f"({type(exc).__name__}: {msg})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj) \
        and any(isinstance(v, Tensor) for v in obj.values())


def read_state_dict(path_or_state_dict: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """The raw tensor state dict from a file or object (``{"model": ...}``, ``{"state_dict": ...}`` or
    plain), and a description of its source."""
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        obj, source = _torch_load(path), str(path)
    else:
        obj, source = path_or_state_dict, "<state dict>"
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source}: no state dict of tensors found (top level: {keys}); expected "
                              "{'model': {...}}, {'state_dict': {...}} or a plain state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, source


_ORIG_BACKBONE = "backbone.0.body."
_D2_BACKBONE = "backbone.0.backbone."


def _convert_original_backbone(rest: str) -> str | None:
    """torchvision ResNet name (after ``backbone.0.body.``) -> detectron2 name; None to drop."""
    if rest.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", rest)
    if m:
        return "stem.conv1." + ("" if m.group(1) == "conv1" else "norm.") + m.group(2)
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", rest)
    if not m:
        return rest
    stage, block, tail = int(m.group(1)) + 1, m.group(2), m.group(3)
    m2 = re.fullmatch(r"bn(\d)\.(\w+)", tail)
    if m2:
        tail = f"conv{m2.group(1)}.norm.{m2.group(2)}"
    m2 = re.fullmatch(r"downsample\.(0|1)\.(\w+)", tail)
    if m2:
        tail = "shortcut." + ("" if m2.group(1) == "0" else "norm.") + m2.group(2)
    return f"res{stage}.{block}.{tail}"


def normalize_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str, list[str]]:
    """Rename any supported layout to our DETR module names.

    Returns (state dict, layout, ignored keys). Strips ``module.`` / ``detr.`` prefixes, converts the
    original DETR's torchvision backbone names to detectron2's and drops ``num_batches_tracked``.
    """
    layout = "plain"
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("detr.") for k in sd):
        layout = "detectron2"
        sd = {(k[len("detr."):] if k.startswith("detr.") else k): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        if k.startswith(_IGNORED_PREFIXES):
            ignored.append(k)
            continue
        if k.startswith(_ORIG_BACKBONE):
            layout = "detr"
            new = _convert_original_backbone(k[len(_ORIG_BACKBONE):])
            if new is None:
                ignored.append(k)
                continue
            k = _D2_BACKBONE + new
        elif k.endswith(".num_batches_tracked"):
            ignored.append(k)
            continue
        out[k] = v
    return out, layout, ignored


def _model_prefix(model: nn.Module) -> str:
    for name in model.state_dict():
        if name.endswith("transformer.decoder.norm.weight"):
            return name[: -len("transformer.decoder.norm.weight")]
    return ""


def infer_config_overrides(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """detectron2 config values implied by a checkpoint (any supported layout).

    Keys: MODEL.DETR.{HIDDEN_DIM, ENC_LAYERS, DEC_LAYERS, DIM_FEEDFORWARD, NUM_OBJECT_QUERIES,
    NUM_CLASSES, PRE_NORM} and MODEL.RESNETS.{DEPTH, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS,
    WIDTH_PER_GROUP}, each only when the checkpoint shows it. NHEADS, STRIDE_IN_1X1 and RES5_DILATION
    cannot be read off the weights.
    """
    sd, _, _ = normalize_state_dict(state_dict)
    out: dict[str, Any] = {}

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in sd if (m := rx.match(k))})

    if "query_embed.weight" in sd:
        q, d = sd["query_embed.weight"].shape
        out["MODEL.DETR.HIDDEN_DIM"] = int(d)
        out["MODEL.DETR.NUM_OBJECT_QUERIES"] = int(q)
    enc = count(r"transformer\.encoder\.layers\.(\d+)\.")
    dec = count(r"transformer\.decoder\.layers\.(\d+)\.")
    if enc or any(k.startswith("transformer.") for k in sd):
        out["MODEL.DETR.ENC_LAYERS"] = enc
    if dec:
        out["MODEL.DETR.DEC_LAYERS"] = dec
    for k in ("transformer.encoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.weight"):
        if k in sd:
            out["MODEL.DETR.DIM_FEEDFORWARD"] = int(sd[k].shape[0])
            break
    if any(k.startswith("transformer.") for k in sd):
        out["MODEL.DETR.PRE_NORM"] = "transformer.encoder.norm.weight" in sd
    if "class_embed.weight" in sd:
        out["MODEL.DETR.NUM_CLASSES"] = int(sd["class_embed.weight"].shape[0]) - 1
    stem = _D2_BACKBONE + "stem.conv1.weight"
    if stem in sd:
        out["MODEL.RESNETS.STEM_OUT_CHANNELS"] = int(sd[stem].shape[0])
    blocks = tuple(count(rf"{re.escape(_D2_BACKBONE)}res{s}\.(\d+)\.") for s in (2, 3, 4, 5))
    if all(blocks):
        bottleneck = any(k.startswith(_D2_BACKBONE + "res2.0.conv3.") for k in sd)
        table = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                 ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
        if (blocks, bottleneck) in table:
            out["MODEL.RESNETS.DEPTH"] = table[(blocks, bottleneck)]
        last = "conv3" if bottleneck else "conv2"
        k = f"{_D2_BACKBONE}res2.0.{last}.weight"
        if k in sd:
            out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = int(sd[k].shape[0])
        k = f"{_D2_BACKBONE}res2.0.conv1.weight"
        if bottleneck and k in sd:
            out["MODEL.RESNETS.WIDTH_PER_GROUP"] = int(sd[k].shape[0])
    return out


_HINT_WORDS = {
    "MODEL.DETR.ENC_LAYERS": "{} encoder layers",
    "MODEL.DETR.DEC_LAYERS": "{} decoder layers",
    "MODEL.DETR.HIDDEN_DIM": "hidden dim {}",
    "MODEL.DETR.NUM_OBJECT_QUERIES": "{} object queries",
    "MODEL.DETR.NUM_CLASSES": "{} classes",
    "MODEL.DETR.DIM_FEEDFORWARD": "FFN dim {}",
    "MODEL.DETR.PRE_NORM": "pre-norm {}",
    "MODEL.RESNETS.DEPTH": "ResNet-{}",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": "{} stem channels",
    "MODEL.RESNETS.RES2_OUT_CHANNELS": "{} res2 channels",
    "MODEL.RESNETS.WIDTH_PER_GROUP": "bottleneck width {}",
}


def config_hints(checkpoint: Mapping[str, Any], model_values: Mapping[str, Any]) -> list[str]:
    """Lines like "checkpoint has 6 encoder layers, config says 3: set MODEL.DETR.ENC_LAYERS 6"."""
    hints = []
    for key, words in _HINT_WORDS.items():
        if key in checkpoint and key in model_values and checkpoint[key] != model_values[key]:
            ck, cf = checkpoint[key], model_values[key]
            hints.append(f"checkpoint has {words.format(ck)}, config says {cf}: set {key} {ck}")
    return hints


def _model_values(model: nn.Module) -> dict[str, Any]:
    values = infer_config_overrides(model.state_dict())
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        from .config import FIELD_KEYS

        for name, key in FIELD_KEYS.items():
            if key in _HINT_WORDS:
                values[key] = getattr(cfg, name)
    return values


def _listing(title: str, items: list[str], n: int = 5) -> str:
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return f"{len(items)} {title}: " + ", ".join(items[:n]) + more


def load_weights(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any],
                 strict: bool = True, source: str | None = None) -> LoadReport:
    """Load DETR weights into ``model`` (our DETR, or a module holding it, e.g. ``.detr``).

    Accepts a file path or an already-loaded object in any supported layout. With ``strict`` any
    missing/unexpected key or shape conflict raises :class:`CheckpointMismatchError` (nothing is loaded);
    otherwise the matching tensors are loaded and the rest reported.
    """
    raw, found = read_state_dict(path_or_state_dict)
    source = source or found  # the file's path where the caller read it already
    sd, layout, ignored = normalize_state_dict(raw)
    prefix = _model_prefix(model)
    if prefix:
        sd = {prefix + k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd
              if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    report = LoadReport(source, layout, 0, missing, unexpected, shapes, ignored)
    if strict and not report.ok:
        hints = config_hints(infer_config_overrides(raw), _model_values(model))
        parts = [f"checkpoint {source} ({layout} layout) does not fit the model"]
        if hints:  # first: the listings below can be long, the hint is what to do
            parts.append("hint: " + "; ".join(hints))
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("shape conflicts",
                                  [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes]))
        raise CheckpointMismatchError("\n  ".join(parts), missing, unexpected, shapes, hints)
    bad = {k for k, _, _ in shapes}
    to_load = {k: v for k, v in sd.items() if k in own and k not in bad}
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report
