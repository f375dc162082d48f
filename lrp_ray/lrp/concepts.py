"""Concept relevance of detections and token heatmaps conditioned on one concept (channel at a layer).

One propagation from each detection's class logit (:func:`detection_relevance`) gives its token map and,
at every requested layer, the relevance of each of the d channels: at an encoder layer summed over valid
tokens; at a decoder layer on the detection's own query, and separately summed over the other queries.

A conditional heatmap R(tokens | detection, channel c at layer L) keeps only channel c of the relevance
carrier at layer L (decoder: on the detection's own query) and propagates on (:func:`conditional_maps`);
any number of channels per detection go through one vectorised pass (the targets dimension). LRP is linear
in its start, so the maps of all d channels sum to the unconditional map: exactly at an encoder layer (every
path crosses it); at a decoder layer together with two remainder targets, :data:`OTHER_QUERIES` (the carrier
on the other queries) and :data:`MEMORY_BYPASS` (what reached the encoder memory through the
cross-attention of the decoder layers above L).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .cache import ForwardCache
from .detections import DetectionSet, logit_start, propagate_from
from .propagate import Ledger
from .rules import token_dot

if TYPE_CHECKING:
    from .engine import LrpEngine

__all__ = ["DetectionRelevance", "ConditionalMaps", "DetectionBatch", "explain_batch", "detection_relevance",
           "conditional_maps",
           "top_channels", "check_layers", "OTHER_QUERIES", "MEMORY_BYPASS"]

OTHER_QUERIES = -1
"""Conditional target (decoder layers): the carrier on every query but the detection's own."""
MEMORY_BYPASS = -2
"""Conditional target (decoder layers): the memory's carrier accumulated above the layer."""

LayerKey = tuple[str, int]


@dataclass
class DetectionRelevance:
    """One batch's detections, propagated from their class logits. Arrays ``[B, M, ...]`` follow
    ``dets`` (padding slots are zero)."""

    dets: DetectionSet
    logit: np.ndarray                # [B, M] relevance at the start (the class logit)
    token_maps: np.ndarray           # [B, M, gh, gw], padding zero
    valid_hw: np.ndarray             # [B, 2]
    input_relevance: np.ndarray      # [B, M]
    bias_relevance: np.ndarray       # [B, M]
    pos_relevance: np.ndarray        # [B, M]
    softmax_relevance: np.ndarray    # [B, M]
    concepts: dict[LayerKey, np.ndarray] = field(default_factory=dict)
    """(module, layer) -> [B, M, d]: encoder all valid tokens, decoder the detection's own query."""
    others: dict[LayerKey, np.ndarray] = field(default_factory=dict)
    """("decoder", layer) -> [B, M, d]: summed over the other queries."""
    taps: dict[LayerKey, tuple[Tensor, Tensor | None]] = field(default_factory=dict, repr=False)
    """(module, layer) -> (g [B, T|Q, M, d], memory g or None) at that layer's output."""


@dataclass
class ConditionalMaps:
    """Token maps of detections conditioned on channels at one layer: arrays ``[B, M, K, ...]``."""

    module: str
    layer: int
    channels: np.ndarray             # [B, M, K] (channel, or OTHER_QUERIES / MEMORY_BYPASS)
    token_maps: np.ndarray           # [B, M, K, gh, gw]
    target_relevance: np.ndarray     # [B, M, K] relevance kept at the layer
    input_relevance: np.ndarray      # [B, M, K]
    bias_relevance: np.ndarray       # [B, M, K] absorbed below the layer
    pos_relevance: np.ndarray        # [B, M, K]
    softmax_relevance: np.ndarray    # [B, M, K]
    token_relevance: Tensor | None = field(default=None, repr=False)
    """With ``keep_tokens``: ``R [B, M*K, T, d] = g * tokens`` at the transformer input (summed over ``d``
    it is ``token_maps``): the upstream relevance of the maps' pixel versions (:mod:`lrp_ray.pixels`)."""


def _head(engine: LrpEngine) -> tuple[Tensor, Tensor]:
    head = engine.parts.class_embed
    return head.weight.detach(), head.bias.detach()


def _np(v: Tensor | float, like: Tensor) -> np.ndarray:
    return (v if torch.is_tensor(v) else torch.zeros_like(like) + v).detach().cpu().numpy()


def _token_maps(cache: ForwardCache, g: Tensor, acc: torch.dtype) -> Tensor:
    """[B, N, gh, gw] from g at the input tokens (padding zero)."""
    valid = ~cache.mask
    token = token_dot(g.to(acc), cache.tokens.to(acc)).transpose(1, 2) * valid[:, None, :].to(acc)
    gh, gw = cache.meta["grid"]
    return token.reshape(token.shape[0], token.shape[1], gh, gw)


def _use_maps(engine: LrpEngine, n_targets: int) -> bool:
    return bool(engine.config.ffn_maps and n_targets >= engine.maps_min_targets)


def check_layers(engine: LrpEngine, layers: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Validated ``{module: layers}`` (ValueError naming the valid range)."""
    out: dict[str, list[int]] = {}
    for module, ls in layers.items():
        for layer in ls:
            engine.validate(module, int(layer), [0])
        out[module] = sorted({int(x) for x in ls})
    return out


@torch.no_grad()
def detection_relevance(engine: LrpEngine, cache: ForwardCache, dets: DetectionSet,
                        layers: Mapping[str, Sequence[int]] | None = None) -> DetectionRelevance:
    """Propagate every detection of ``dets`` from its class logit to the input tokens (one pass), with
    the channel relevance at ``layers`` (``{"encoder": [...], "decoder": [...]}``)."""
    layers = check_layers(engine, layers or {})
    cache = cache.to(engine.device)
    acc, w, rules = engine._acc, engine.weights, engine.rules
    wc, bc = _head(engine)
    ledger = Ledger(acc)
    g, z = logit_start(cache, rules, dets, wc, bc, engine._norm_acc, engine._gdtype, ledger)
    want = {(m, layer) for m, ls in layers.items() for layer in ls}
    taps: dict[LayerKey, tuple[Tensor, Tensor | None]] = {}

    def visit(module: str, layer: int, g: Tensor, g_mem: Tensor | None, led: Ledger) -> None:
        if (module, layer) in want:
            taps[(module, layer)] = (g, g_mem)

    top = len(w.decoder) - 1
    g = propagate_from(cache, w, rules, "decoder", top, g, None, ledger, visit,
                       _use_maps(engine, dets.width), engine.maps_budget)
    maps = _token_maps(cache, g, acc)
    res = DetectionRelevance(
        dets=dets, logit=_np(z.to(acc), z), token_maps=_np(maps, maps),
        valid_hw=np.asarray(cache.meta["valid_hw"]),
        input_relevance=_np(maps.sum((-1, -2)), z), bias_relevance=_np(ledger.bias, z.to(acc)),
        pos_relevance=_np(ledger.pos, z.to(acc)), softmax_relevance=_np(ledger.softmax, z.to(acc)),
        taps=taps)
    valid = (~cache.mask).to(acc)
    q = torch.as_tensor(np.where(dets.valid, dets.query, 0), device=engine.device)
    ar = torch.arange(q.shape[0], device=engine.device)[:, None]
    sl = torch.arange(q.shape[1], device=engine.device)[None, :]
    for (module, layer), (gt, _) in taps.items():
        if module == "encoder":
            y = cache.encoder[layer].y.to(acc) * valid[..., None]
            res.concepts[(module, layer)] = _np((gt.to(acc) * y[:, :, None, :]).sum(1), z)
        else:
            prod = gt.to(acc) * cache.decoder[layer].y.to(acc)[:, :, None, :]     # [B, Q, M, d]
            own = prod[ar, q, sl]                                                 # [B, M, d]
            res.concepts[(module, layer)] = _np(own, z)
            res.others[(module, layer)] = _np(prod.sum(1) - own, z)
    return res


@torch.no_grad()
def conditional_maps(engine: LrpEngine, cache: ForwardCache, rel: DetectionRelevance, module: str, layer: int,
                     channels: np.ndarray, keep_tokens: bool = False) -> ConditionalMaps:
    """Token maps conditioned on ``channels`` [B, M, K] at ``module`` layer ``layer`` (a layer tapped by
    :func:`detection_relevance`), all in one pass of ``M * K`` targets per image; ``keep_tokens`` also
    keeps the relevance per token and channel (``token_relevance``)."""
    if (module, layer) not in rel.taps:
        raise ValueError(f"{module} layer {layer} was not requested from detection_relevance")
    channels = np.asarray(channels, dtype=np.int64)
    b, m = rel.dets.query.shape
    if channels.ndim != 3 or channels.shape[:2] != (b, m):
        raise ValueError(f"channels must be [B, M, K] = [{b}, {m}, K], got {channels.shape}")
    d = engine.weights.hidden_dim
    lo = MEMORY_BYPASS if module == "decoder" else 0
    if channels.size and (channels.min() < lo or channels.max() >= d):
        raise ValueError(f"channels must be in {lo}..{d - 1} at {module} layers")
    cache = cache.to(engine.device)
    acc, w, rules, dev = engine._acc, engine.weights, engine.rules, engine.device
    k = channels.shape[2]
    n = m * k
    gt, gm = rel.taps[(module, layer)]
    g = gt.repeat_interleave(k, dim=2)                                            # [B, T, N, d]
    mask = torch.zeros_like(g)
    keep_mem = torch.zeros(b, n, dtype=g.dtype, device=dev)
    q = np.where(rel.dets.valid, rel.dets.query, 0)
    for bi in range(b):
        for mi in range(m):
            for ki in range(k):
                c, t = int(channels[bi, mi, ki]), mi * k + ki
                if module == "encoder":
                    mask[bi, :, t, c] = 1.0
                elif c >= 0:
                    mask[bi, int(q[bi, mi]), t, c] = 1.0
                elif c == OTHER_QUERIES:
                    mask[bi, :, t, :] = 1.0
                    mask[bi, int(q[bi, mi]), t, :] = 0.0
                else:
                    keep_mem[bi, t] = 1.0
    g = g * mask
    ledger = Ledger(acc)
    if module == "decoder":
        g_mem = gm.repeat_interleave(k, dim=2) * keep_mem[:, None, :, None]
        target = ledger.rel(cache.decoder[layer].y, g) + ledger.rel(cache.memory, g_mem)
    else:
        g_mem = None
        target = ledger.rel(cache.encoder[layer].y, g)
    g = propagate_from(cache, w, rules, module, layer, g, g_mem, ledger, None, _use_maps(engine, n),
                       engine.maps_budget)
    maps = _token_maps(cache, g, acc)
    tokens = None
    if keep_tokens:
        x0 = cache.tokens.to(acc) * (~cache.mask)[..., None].to(acc)
        tokens = (g.to(acc) * x0[:, :, None, :]).transpose(1, 2)
    gh, gw = maps.shape[-2:]
    shape = (b, m, k)
    r = lambda v: _np(v, target).reshape(shape)
    return ConditionalMaps(
        module=module, layer=int(layer), channels=channels,
        token_maps=_np(maps, maps).reshape(b, m, k, gh, gw),
        target_relevance=r(target), input_relevance=r(maps.sum((-1, -2))), bias_relevance=r(ledger.bias),
        pos_relevance=r(ledger.pos), softmax_relevance=r(ledger.softmax), token_relevance=tokens)


def top_channels(rel: DetectionRelevance, module: str, layer: int, k: int) -> np.ndarray:
    """The ``k`` channels of highest concept relevance per detection at (module, layer): [B, M, k]."""
    c = rel.concepts[(module, layer)]
    k = max(0, min(int(k), c.shape[-1]))
    return np.argsort(-c, axis=-1, kind="stable")[..., :k]


@dataclass
class DetectionBatch:
    """Everything a detection target computes for one image batch: the selected detections, their
    propagation (None when nothing was selected) and, per tapped layer, the maps conditioned on each
    detection's top channels (empty when ``top_concepts`` is 0)."""

    dets: DetectionSet
    relevance: DetectionRelevance | None
    conditional: dict[LayerKey, ConditionalMaps] = field(default_factory=dict)


@torch.no_grad()
def explain_batch(engine: LrpEngine, cache: ForwardCache, selection: Sequence[tuple[int, int]] | str,
                  layers: Mapping[str, Sequence[int]], top_concepts: int,
                  keep_tokens: bool = False) -> DetectionBatch:
    """Select detections on ``cache`` (see :func:`select_detections`), propagate them once with the
    concepts at ``layers``, and compute the ``top_concepts`` conditional maps of every tapped layer (one
    vectorised pass per layer; ``keep_tokens``: with their relevance per token and channel)."""
    from .detections import select_detections

    dets = select_detections(cache, selection)
    if not dets.valid.any():
        return DetectionBatch(dets, None)
    rel = detection_relevance(engine, cache, dets, layers)
    out = DetectionBatch(dets, rel)
    if int(top_concepts) > 0:
        for module, layer in sorted(rel.concepts):
            chans = top_channels(rel, module, layer, int(top_concepts))
            out.conditional[(module, layer)] = conditional_maps(engine, cache, rel, module, layer, chans,
                                                                keep_tokens)
    return out
