"""Pixel maps on the original image's grid: sum-preserving resampling and block sums.

The backbone sees the image resized to its input size; its pixel relevance is spread back onto the
original grid by overlap (each input pixel's relevance split over the original pixels it covers, so the
total is unchanged), then reduced to at most ``max_side`` pixels per side by summing ``f x f`` blocks.
Both steps are linear maps whose columns sum to one: the map's sum is the total pixel relevance.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_MAX_SIDE", "block_factor", "reduced_shape", "overlap_matrix", "block_sum",
           "to_image_grid"]

DEFAULT_MAX_SIDE = 256


def block_factor(h: int, w: int, max_side: int | None) -> int:
    """Smallest integer block side ``f`` with ``ceil(max(h, w) / f) <= max_side`` (1: no reduction)."""
    if max_side is None:
        return 1
    if int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    return max(1, math.ceil(max(int(h), int(w)) / int(max_side)))


def reduced_shape(h: int, w: int, max_side: int | None = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(pixel_h, pixel_w) of an ``h`` x ``w`` image's map reduced to ``max_side``."""
    f = block_factor(h, w, max_side)
    return math.ceil(int(h) / f), math.ceil(int(w) / f)


def overlap_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: the share of input cell i (of n_in equal cells over [0, 1]) that falls in output
    cell j (of n_out); every column sums to 1."""
    a = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_in):
        lo, hi = i * n_out / n_in, (i + 1) * n_out / n_in
        for j in range(int(math.floor(lo)), min(n_out, int(math.ceil(hi)))):
            a[j, i] = (min(hi, j + 1) - max(lo, j)) * n_in / n_out
    return a


def _block_matrix(n: int, f: int) -> np.ndarray:
    """[ceil(n/f), n]: sums blocks of ``f`` consecutive cells."""
    out = np.zeros((math.ceil(n / f), n), dtype=np.float64)
    out[np.arange(n) // f, np.arange(n)] = 1.0
    return out


def block_sum(maps: np.ndarray, f: int) -> np.ndarray:
    """``maps`` [..., h, w] with ``f x f`` blocks summed (edge blocks may be partial): [..., ceil(h/f),
    ceil(w/f)]."""
    h, w = maps.shape[-2:]
    return _block_matrix(h, f) @ maps @ _block_matrix(w, f).T


def to_image_grid(maps: np.ndarray, image_size: tuple[int, int], max_side: int | None = DEFAULT_MAX_SIDE,
                  ) -> np.ndarray:
    """Input-grid maps [..., h_in, w_in] -> the original image's grid ``image_size`` (h, w) reduced to
    ``max_side``: [..., pixel_h, pixel_w], same sums (float64)."""
    h0, w0 = int(image_size[0]), int(image_size[1])
    f = block_factor(h0, w0, max_side)
    ah = _block_matrix(h0, f) @ overlap_matrix(maps.shape[-2], h0)
    aw = _block_matrix(w0, f) @ overlap_matrix(maps.shape[-1], w0)
    return ah @ np.asarray(maps, dtype=np.float64) @ aw.T
