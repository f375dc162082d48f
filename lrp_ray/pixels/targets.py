"""Pixel maps for the engine's targets: feature targets, detections, or any token x channel relevance.

The entry points take the engine, a :class:`~lrp_ray.lrp.ForwardCache` and the ``ImageBatch`` the cache
was computed from (the cache keeps tokens, not pixels), and return :class:`PixelMaps` ``[B, N, H', W']``
on each original image's grid reduced to ``max_side``. Per image: one forward of the backbone under the
composite and one vectorised backward for all of its targets (chunked by a fixed byte budget).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .backbone import BackbonePropagator
from .composites import DEFAULT_COMPOSITE, CompositeSpec, resolve_composite
from .maps import DEFAULT_MAX_SIDE, reduced_shape, to_image_grid

__all__ = ["PixelMaps", "propagator_for", "pixel_maps_from_tokens", "feature_pixel_maps",
           "detection_pixel_maps"]

_PROPAGATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class PixelMaps:
    """Pixel relevance of ``N`` targets per image: ``maps [B, N, H', W']`` (float32; each image's map in
    its top-left ``shape_hw[b]``, zero beyond), ``pixel_relevance [B, N]`` (each map's sum) and
    ``token_relevance [B, N]`` (the relevance that entered the backbone: the token map's sum).
    ``identity``: what decides the numbers (composite and parameters, zennit version, dtype)."""

    composite: str
    identity: dict[str, Any]
    max_side: int | None
    maps: np.ndarray
    shape_hw: np.ndarray
    pixel_relevance: np.ndarray
    token_relevance: np.ndarray
    features: np.ndarray | None = None     # [N] feature targets
    queries: np.ndarray | None = None      # [B, N] (-1 encoder / detection padding)
    extra: dict[str, Any] = field(default_factory=dict)

    def pixel_map(self, image: int, target: int) -> np.ndarray:
        """One map on its image's (reduced) grid."""
        h, w = self.shape_hw[image]
        return self.maps[image, target, :h, :w]


def propagator_for(engine: Any, composite: str | CompositeSpec = DEFAULT_COMPOSITE) -> BackbonePropagator:
    """The engine's backbone propagator for ``composite`` (built once per engine and composite; fp64 for
    an fp64 engine, fp32 otherwise; on the engine's device)."""
    spec = resolve_composite(composite)
    per = _PROPAGATORS.setdefault(engine, {})
    if spec not in per:
        dtype = torch.float64 if engine.config.precision == "fp64" else torch.float32
        detr = engine.parts.module
        per[spec] = BackbonePropagator(detr, engine.parts.input_proj, spec, dtype, engine.device,
                                       getattr(detr, "cfg", None))
    return per[spec]


def _image(batch: Any, b: int) -> Tensor:
    h, w = (int(v) for v in batch.input_sizes[b])
    return batch.tensor[b, :, :h, :w]


@torch.no_grad()
def pixel_maps_from_tokens(engine: Any, cache: Any, batch: Any, token_rel: Tensor,
                           composite: str | CompositeSpec = DEFAULT_COMPOSITE,
                           max_side: int | None = DEFAULT_MAX_SIDE, chunk: int | None = None,
                           valid: np.ndarray | None = None) -> PixelMaps:
    """Pixel maps from the relevance at the transformer input ``token_rel [B, N, T, d]`` (tokens in the
    cache's padded grid; e.g. :meth:`LrpEngine.token_relevance`). ``valid [B, N]`` bool: targets to
    compute (others stay zero, e.g. detection padding)."""
    prop = propagator_for(engine, composite)
    b_n, n = int(token_rel.shape[0]), int(token_rel.shape[1])
    if b_n != cache.batch_size or len(batch.input_sizes) != b_n:
        raise ValueError(f"token relevance has {b_n} images, the cache {cache.batch_size}, the batch "
                         f"{len(batch.input_sizes)}")
    gh, gw = (int(v) for v in cache.meta["grid"])
    d = int(token_rel.shape[-1])
    shapes = np.array([reduced_shape(*batch.image_sizes[b], max_side) for b in range(b_n)], dtype=np.int64)
    hmax, wmax = (int(shapes[:, 0].max()), int(shapes[:, 1].max())) if b_n else (0, 0)
    maps = np.zeros((b_n, n, hmax, wmax), dtype=np.float32)
    total = np.zeros((b_n, n), dtype=np.float64)
    tokens = cache.tokens
    for b in range(b_n):
        vh, vw = (int(v) for v in cache.meta["valid_hw"][b])
        idx = np.arange(n) if valid is None else np.flatnonzero(valid[b])
        if idx.size == 0:
            continue
        r = token_rel[b, torch.as_tensor(idx)].reshape(idx.size, gh, gw, d)[:, :vh, :vw].permute(0, 3, 1, 2)
        ref = tokens[b].reshape(gh, gw, d)[:vh, :vw].permute(2, 0, 1)
        pix = prop.relevance(_image(batch, b), r, chunk=chunk, reference=ref).sum(1)   # [n, h_in, w_in]
        grid = to_image_grid(pix.double().cpu().numpy(), batch.image_sizes[b], max_side)
        h, w = shapes[b]
        maps[b, idx, :h, :w] = grid
        total[b, idx] = grid.sum((-1, -2))
    tok = token_rel.sum((-1, -2)).double().cpu().numpy()
    if valid is not None:
        tok = np.where(valid, tok, 0.0)
    return PixelMaps(composite=prop.spec.name, identity=prop.identity(), max_side=max_side, maps=maps,
                     shape_hw=shapes, pixel_relevance=total, token_relevance=tok)


def feature_pixel_maps(engine: Any, cache: Any, batch: Any, module: str, layer: int, features: Sequence[int],
                       queries: Any = None, composite: str | CompositeSpec = DEFAULT_COMPOSITE,
                       max_side: int | None = DEFAULT_MAX_SIDE, chunk: int | None = None) -> PixelMaps:
    """Pixel maps of the targets of ``engine.relevance(cache, module, layer, features, queries)`` (same
    target order: features x selected queries): ``maps [B, N, H', W']``."""
    resolve_composite(composite)
    rel, qs = engine.token_relevance(cache, module, layer, features, queries)
    out = pixel_maps_from_tokens(engine, cache, batch, rel, composite, max_side, chunk)
    r = qs.shape[1] // max(1, len(features))
    out.features = np.repeat(np.asarray([int(f) for f in features]), r)
    out.queries = qs
    return out


def detection_pixel_maps(engine: Any, cache: Any, batch: Any, dets: Any,
                         composite: str | CompositeSpec = DEFAULT_COMPOSITE,
                         max_side: int | None = DEFAULT_MAX_SIDE, chunk: int | None = None) -> PixelMaps:
    """Pixel maps of the detections ``dets`` (a :class:`~lrp_ray.lrp.DetectionSet`, e.g. a
    ``DetectionBatch``'s ``.dets``), started at each class logit: ``maps [B, M, H', W']``, padding slots
    zero."""
    resolve_composite(composite)
    rel = engine.detection_token_relevance(cache, dets)
    out = pixel_maps_from_tokens(engine, cache, batch, rel, composite, max_side, chunk, valid=dets.valid)
    out.queries = np.where(dets.valid, dets.query, -1)
    return out
