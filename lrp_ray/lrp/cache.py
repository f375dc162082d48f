"""The forward cache: every activation the relevance backward needs, for one image batch.

A plain object of named tensors plus JSON-able metadata. It can be moved between devices and converted
to numpy arrays (for Ray's object store) and back; its size in bytes is reported by :attr:`nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16", torch.bool: "bool"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class ForwardCache:
    """Named activations of one forward pass (both modules, every layer) and batch metadata.

    ``meta`` holds: ``grid`` (h, w) of the padded feature grid, ``valid_hw`` per image, ``image_sizes``,
    ``enc_layers``, ``dec_layers``, ``nheads``, ``pre_norm``, ``num_queries``, ``hidden_dim``, ``dim_ff``.
    """

    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)
    """Target-independent data derived from the tensors (e.g. per-token FFN maps); never serialised."""

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @property
    def nbytes(self) -> int:
        """Total bytes held by the cached tensors."""
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))

    @property
    def derived_nbytes(self) -> int:
        """Bytes held by derived data (rebuilt on demand, not part of :attr:`nbytes`)."""
        return int(sum(t.numel() * t.element_size() for v in self.derived.values() for t in v))

    def drop_derived(self) -> None:
        self.derived.clear()

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def batch_size(self) -> int:
        return int(self.tensors["mask"].shape[0])

    def to(self, device: str | torch.device) -> ForwardCache:
        """A copy on ``device`` (same object when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return ForwardCache({k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))

    def to_numpy(self) -> dict[str, Any]:
        """Arrays for serialisation (bf16 is stored bit-exactly as int16 with its dtype recorded)."""
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for k, t in self.tensors.items():
            t = t.detach().cpu()
            dtypes[k] = _DTYPE_NAMES[t.dtype]
            arrays[k] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        return {"arrays": arrays, "dtypes": dtypes, "meta": dict(self.meta)}

    @classmethod
    def from_numpy(cls, payload: dict[str, Any], device: str | torch.device = "cpu") -> ForwardCache:
        """Inverse of :meth:`to_numpy`."""
        tensors = {}
        for k, a in payload["arrays"].items():
            t = torch.from_numpy(np.array(a, copy=True))
            if payload["dtypes"][k] == "bfloat16":
                t = t.view(torch.bfloat16)
            tensors[k] = t.to(device)
        return cls(tensors, dict(payload["meta"]))
