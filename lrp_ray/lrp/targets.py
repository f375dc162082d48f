"""Target construction: which (feature, query) pairs start the relevance, and their start tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..queries import top_k
from .cache import ForwardCache

QuerySpec = str | Sequence[int] | None


def query_scores(cache: ForwardCache) -> Tensor:
    """Detection score per query: max class probability excluding the no-object class, [B, Q]."""
    probs = cache.pred_logits.float().softmax(-1)[..., :-1]
    return probs.max(-1).values


def select_queries(cache: ForwardCache, queries: QuerySpec) -> np.ndarray:
    """Per-image query ids ``[B, R]`` for ``"all"``, ``"topK"`` or explicit ids."""
    b = cache.batch_size
    nq = int(cache.meta["num_queries"])
    if queries is None or (isinstance(queries, str) and queries == "all"):
        return np.tile(np.arange(nq), (b, 1))
    if isinstance(queries, str):
        k = top_k(queries)
        if k is None:
            raise ValueError(f"queries must be 'all', 'topK' (e.g. 'top5') or a list of ids, got {queries!r}")
        if not 1 <= k <= nq:
            raise ValueError(f"top-k queries: k must be in 1..{nq}, got {k}")
        return query_scores(cache).topk(k, dim=-1).indices.cpu().numpy()
    ids = [int(q) for q in queries]
    bad = [q for q in ids if not 0 <= q < nq]
    if bad or not ids:
        raise ValueError(f"query ids must be in 0..{nq - 1}, got {ids}")
    return np.tile(np.asarray(ids), (b, 1))


def encoder_start(features: Sequence[int], valid: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """g at an encoder layer output: one-hot channel f on every valid token, [B, T, N, d]."""
    b, t = valid.shape
    g = torch.zeros(b, t, len(features), d, dtype=dtype, device=valid.device)
    idx = torch.arange(len(features), device=valid.device)
    g[:, :, idx, torch.as_tensor(list(features), device=valid.device)] = 1.0
    return g * valid[:, :, None, None].to(dtype)


@dataclass(frozen=True)
class EncoderStart:
    """:func:`encoder_start` kept implicit: the propagation materialises it only where it must, and
    takes rows of per-token maps directly instead of multiplying them by one-hot vectors."""

    features: tuple[int, ...]
    valid: Tensor
    d: int
    dtype: torch.dtype

    def dense(self) -> Tensor:
        return encoder_start(self.features, self.valid, self.d, self.dtype)

    def dot(self, x: Tensor, acc: torch.dtype) -> Tensor:
        """``sum_t g[b,t,n,:] . x[b,t,:]``: [B, N]."""
        return (x[:, :, list(self.features)].to(acc) * self.valid[:, :, None].to(acc)).sum(1)

    def rows(self, e: Tensor) -> Tensor:
        """``g @ E_t`` for per-token matrices ``e`` [B, T, d, d]: [B, T, N, d]."""
        idx = torch.as_tensor(self.features, device=e.device)
        return e.index_select(2, idx).to(self.dtype) * self.valid[:, :, None, None].to(self.dtype)


def decoder_start(features: Sequence[int], qsel: np.ndarray, nq: int, d: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """g at a decoder layer output: one-hot (query, feature) per target, [B, Q, N, d].

    Target ``n`` is feature ``features[n // R]`` on the image's ``n % R``-th selected query.
    """
    b, r = qsel.shape
    n = len(features) * r
    g = torch.zeros(b, nq, n, d, dtype=dtype, device=device)
    tgt = torch.arange(n, device=device)
    feat = torch.as_tensor(np.repeat(np.asarray(features), r), device=device)
    for bi in range(b):
        q = torch.as_tensor(np.tile(qsel[bi], len(features)), device=device)
        g[bi, q, tgt, feat] = 1.0
    return g
