"""The forward cache: every activation the relevance backward needs, for one image batch.

Typed per-layer records (:class:`EncoderLayerRecord`, :class:`DecoderLayerRecord`) of attention
(:class:`AttentionRecord`), LayerNorm (:class:`NormRecord`) and FFN (:class:`FfnRecord`) activations,
named by role (what each LayerNorm feeds), so their meaning does not change between pre- and post-norm
models. A tensor may appear in several places (a layer's output is the next layer's input; a post-norm
layer's output is its ``out_norm`` output); it is stored, counted, moved and serialised once.

The cache can be moved between devices and converted to numpy arrays (for Ray's object store) and back
bit-exactly; its size in bytes is reported by :attr:`ForwardCache.nbytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16", torch.bool: "bool"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class AttentionRecord:
    """One multi-head attention: probabilities ``p`` [B,H,Tq,Tk] (compute dtype), projections ``q``,
    ``k``, ``v`` [B,T,d], heads' output ``o`` (before ``out_proj``) and the attention output ``a``."""

    p: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    a: Tensor


@dataclass
class NormRecord:
    """One LayerNorm application: its output ``y`` [B,T,d] and 1/std per token ``rstd`` [B,T]."""

    y: Tensor
    rstd: Tensor


@dataclass
class FfnRecord:
    """The feed-forward net: hidden pre-activation ``u`` [B,T,dff] (compute dtype) and output ``f``."""

    u: Tensor
    f: Tensor


@dataclass
class EncoderLayerRecord:
    """An encoder layer, input ``x`` to output ``y``.

    pre-norm: ``n = attn_norm(x)``, ``z = x + attn(n + pos, n + pos, n)``, ``y = z + ffn(ffn_norm(z))``.
    post-norm: ``z = x + attn(x + pos, x + pos, x)``, ``h = ffn_norm(z)``, ``y = out_norm(h + ffn(h))``.
    """

    x: Tensor
    attn: AttentionRecord
    ffn_norm: NormRecord
    ffn: FfnRecord
    y: Tensor
    attn_norm: NormRecord | None = None
    out_norm: NormRecord | None = None

    @property
    def pre_norm(self) -> bool:
        return self.out_norm is None


@dataclass
class DecoderLayerRecord:
    """A decoder layer, query-stream input ``x`` to output ``y`` (``qpos`` the query embeddings).

    pre-norm: ``n1 = self_attn_norm(x)``, ``z1 = x + self_attn(n1 + qpos, n1 + qpos, n1)``,
    ``n2 = cross_attn_norm(z1)``, ``z2 = z1 + cross_attn(n2 + qpos, memory + pos, memory)``,
    ``y = z2 + ffn(ffn_norm(z2))``.
    post-norm: ``h1 = cross_attn_norm(x + self_attn(x + qpos, x + qpos, x))``,
    ``h2 = ffn_norm(h1 + cross_attn(h1 + qpos, memory + pos, memory))``, ``y = out_norm(h2 + ffn(h2))``.
    """

    x: Tensor
    self_attn: AttentionRecord
    cross_attn_norm: NormRecord
    cross_attn: AttentionRecord
    ffn_norm: NormRecord
    ffn: FfnRecord
    y: Tensor
    self_attn_norm: NormRecord | None = None
    out_norm: NormRecord | None = None

    @property
    def pre_norm(self) -> bool:
        return self.out_norm is None


_RECORDS: dict[str, type] = {c.__name__: c for c in (AttentionRecord, NormRecord, FfnRecord,
                                                    EncoderLayerRecord, DecoderLayerRecord)}
_DATA = ("encoder", "decoder", "pos", "mask", "qpos", "encoder_norm", "pred_logits", "pred_boxes")
_LEGACY_KEYS = ("pred_logits", "pred_boxes", "mask", "pos", "qpos", "memory")


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Tensor]]:
    """Every (path, tensor) below ``obj`` (dataclass records and lists), duplicates included."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}.{i}")
    elif is_dataclass(obj):
        for f in fields(obj):
            yield from _walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)


def _map(obj: Any, fn: Callable[[Tensor], Tensor], memo: dict[int, Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor once (shared tensors stay shared)."""
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = fn(obj)
        return memo[id(obj)]
    if isinstance(obj, list):
        return [_map(v, fn, memo) for v in obj]
    if is_dataclass(obj):
        return type(obj)(**{f.name: _map(getattr(obj, f.name), fn, memo) for f in fields(obj)})
    return obj


def _layout(obj: Any, keys: dict[int, str]) -> Any:
    """JSON-able structure of ``obj`` with tensors replaced by their array keys."""
    if isinstance(obj, Tensor):
        return {"tensor": keys[id(obj)]}
    if isinstance(obj, list):
        return [_layout(v, keys) for v in obj]
    if is_dataclass(obj):
        return {"record": type(obj).__name__,
                "fields": {f.name: _layout(getattr(obj, f.name), keys) for f in fields(obj)}}
    return obj


def _build(layout: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`_layout`."""
    if isinstance(layout, list):
        return [_build(v, tensors) for v in layout]
    if isinstance(layout, dict) and "tensor" in layout:
        return tensors[layout["tensor"]]
    if isinstance(layout, dict) and "record" in layout:
        cls = _RECORDS[layout["record"]]
        return cls(**{k: _build(v, tensors) for k, v in layout["fields"].items()})
    return layout


@dataclass
class ForwardCache:
    """Activations of one forward pass (both modules, every layer) and batch metadata.

    ``encoder``/``decoder`` hold one record per layer; ``pos`` [B,T,d] and ``mask`` [B,T] (True =
    padding) are the encoder tokens' positional embeddings and padding; ``qpos`` [Q,d] the object query
    embeddings; ``encoder_norm`` the final encoder LayerNorm (its output is the memory) if the model has
    one; ``pred_logits``/``pred_boxes`` the detection heads' outputs.

    ``meta`` holds: ``grid`` (h, w) of the padded feature grid, ``valid_hw`` per image, ``image_sizes``,
    ``enc_layers``, ``dec_layers``, ``nheads``, ``pre_norm``, ``num_queries``, ``hidden_dim``, ``dim_ff``.
    """

    encoder: list[EncoderLayerRecord]
    decoder: list[DecoderLayerRecord]
    pos: Tensor
    mask: Tensor
    qpos: Tensor
    encoder_norm: NormRecord | None = None
    pred_logits: Tensor | None = None
    pred_boxes: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)
    """Target-independent data derived from the activations (e.g. per-token FFN maps); never
    serialised, not part of :attr:`nbytes`."""

    # --------------------------------------------------------------------------- named views
    @property
    def tokens(self) -> Tensor:
        """The encoder input tokens [B,T,d] (what relevance is attributed to)."""
        return self.encoder[0].x

    @property
    def encoder_out(self) -> Tensor:
        """The last encoder layer's output [B,T,d]."""
        return self.encoder[-1].y

    @property
    def memory(self) -> Tensor:
        """What the decoder attends to: the encoder output after ``encoder_norm`` if there is one."""
        return self.encoder_norm.y if self.encoder_norm is not None else self.encoder_out

    @property
    def decoder_out(self) -> Tensor:
        """The last decoder layer's output [B,Q,d] (before the decoder's final norm)."""
        return self.decoder[-1].y

    def __getitem__(self, key: str) -> Tensor:
        """Compatibility access to top-level tensors (``pred_logits``, ``pred_boxes``, ``mask``, ``pos``,
        ``qpos``, ``memory``); per-layer activations are typed records (``cache.encoder[i]``)."""
        if key not in _LEGACY_KEYS:
            raise KeyError(f"{key!r}: the cache holds typed records (cache.encoder[i], cache.decoder[j]); "
                           f"by name only {', '.join(_LEGACY_KEYS)}")
        value = getattr(self, key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return key in _LEGACY_KEYS and getattr(self, key) is not None

    # --------------------------------------------------------------------------- storage
    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """Every stored tensor once (shared ones under their first path, e.g. ``encoder.0.attn.p``)."""
        seen: set[int] = set()
        out = []
        for name in _DATA:
            for path, t in _walk(getattr(self, name), name):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append((path, t))
        return out

    @property
    def nbytes(self) -> int:
        """Total bytes held by the cached tensors (each stored tensor counted once)."""
        return int(sum(t.numel() * t.element_size() for _, t in self.named_tensors()))

    @property
    def derived_nbytes(self) -> int:
        """Bytes held by derived data (rebuilt on demand, not part of :attr:`nbytes`)."""
        return int(sum(t.numel() * t.element_size() for v in self.derived.values() for t in v))

    def drop_derived(self) -> None:
        """Free the derived data (the engine rebuilds it, identically, when needed)."""
        self.derived.clear()

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    def _with(self, fn: Callable[[Tensor], Tensor]) -> ForwardCache:
        memo: dict[int, Tensor] = {}
        data = {name: _map(getattr(self, name), fn, memo) for name in _DATA}
        return ForwardCache(**data, meta=dict(self.meta))

    def to(self, device: str | torch.device) -> ForwardCache:
        """A copy on ``device`` (same object when already there; derived data is not copied)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return self._with(lambda t: t.to(device))

    def to_numpy(self) -> dict[str, Any]:
        """Arrays for serialisation (bf16 is stored bit-exactly as int16 with its dtype recorded), the
        records' layout and the metadata."""
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        keys: dict[int, str] = {}
        for path, t in self.named_tensors():
            keys[id(t)] = path
            t = t.detach().cpu()
            dtypes[path] = _DTYPE_NAMES[t.dtype]
            arrays[path] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        layout = {name: _layout(getattr(self, name), keys) for name in _DATA}
        return {"arrays": arrays, "dtypes": dtypes, "layout": layout, "meta": dict(self.meta)}

    @classmethod
    def from_numpy(cls, payload: dict[str, Any], device: str | torch.device = "cpu") -> ForwardCache:
        """Inverse of :meth:`to_numpy` (bit-exact)."""
        tensors = {}
        for k, a in payload["arrays"].items():
            t = torch.from_numpy(np.array(a, copy=True))
            if payload["dtypes"][k] == "bfloat16":
                t = t.view(torch.bfloat16)
            tensors[k] = t.to(device)
        data = {name: _build(payload["layout"][name], tensors) for name in _DATA}
        return cls(**data, meta=dict(payload["meta"]))
