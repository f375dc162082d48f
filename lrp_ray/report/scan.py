"""One streaming pass over ``OUT/relevance``: every row's scalars plus per-layer means of the vectors.

Part files are read one at a time (``lrp_ray.results.iter_parts``); token maps are never read here. What is
kept: a frame of scalar columns for every row (a few dozen bytes a row: 400,000 rows cost tens of MB) and,
per (module, layer), running sums of ``channel_relevance`` per feature, of ``profile`` and of the
conservation parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lrp_ray.results import iter_parts, part_files

__all__ = ["LayerStats", "Scan", "scan", "SCALARS"]

SCALARS = ["image", "image_h", "image_w", "input_h", "input_w", "grid_h", "grid_w", "stride", "feature",
           "query", "act_sum", "act_max", "act_mean", "relevance_total", "input_relevance", "bias_relevance",
           "pos_relevance", "softmax_relevance"]
_VECTORS = ["channel_relevance", "profile"]


@dataclass
class LayerStats:
    """Per (module, layer) sums over its rows (the run page's matrices and conservation figures)."""

    module: str
    layer: int
    rows: int = 0
    channel_sum: dict[int, np.ndarray] = field(default_factory=dict)
    channel_n: dict[int, int] = field(default_factory=dict)
    profile_sum: np.ndarray | None = None
    profile_frac_sum: np.ndarray | None = None
    profile_n: int = 0
    parts_sum: dict[str, float] = field(default_factory=dict)


@dataclass
class Scan:
    """The scalars of every row (``rows``: module, layer, the :data:`SCALARS`, ``frag`` = index of the
    row's part file in ``files``) and per-layer sums."""

    rows: pd.DataFrame
    layers: dict[tuple[str, int], LayerStats]
    files: list[Path]


def _np(t: Any, name: str) -> np.ndarray:
    return np.asarray(t.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _matrix(t: Any, name: str) -> np.ndarray | None:
    """A list column as ``[rows, width]`` (None when its lists differ in length)."""
    n = t.num_rows
    flat = np.asarray(t.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float64)
    width = len(flat) // n if n else 0
    return flat.reshape(n, width) if width and width * n == len(flat) else None


def _add_vectors(st: LayerStats, t: Any, feats: np.ndarray) -> None:
    n = t.num_rows
    tgt = _np(t, "relevance_total")
    for c in ("relevance_total", "input_relevance", "bias_relevance", "pos_relevance", "softmax_relevance"):
        st.parts_sum[c] = st.parts_sum.get(c, 0.0) + float(np.nansum(_np(t, c)))
    chan = _matrix(t, "channel_relevance")
    if chan is not None:
        order = np.argsort(feats, kind="stable")
        uniq, starts = np.unique(feats[order], return_index=True)
        sums = np.add.reduceat(np.nan_to_num(chan[order]), starts, axis=0)
        counts = np.diff(np.append(starts, n))
        for f, s, c in zip(uniq.tolist(), sums, counts.tolist(), strict=True):
            st.channel_sum[f] = st.channel_sum[f] + s if f in st.channel_sum else s
            st.channel_n[f] = st.channel_n.get(f, 0) + c
    mat = _matrix(t, "profile")
    if mat is not None:
        p = mat.shape[1]
        if st.profile_sum is None or st.profile_sum.shape[0] != p:
            st.profile_sum, st.profile_frac_sum, st.profile_n = np.zeros(p), np.zeros(p), 0
        st.profile_sum += np.nansum(mat, axis=0)
        denom = np.where(np.abs(tgt) > 1e-12, tgt, np.nan)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = mat / denom
        st.profile_frac_sum += np.nansum(np.where(np.isfinite(frac), frac, 0.0), axis=0)
        st.profile_n += n


def scan(out: str | Path, vectors: bool = True) -> Scan:
    """Read every part file once (scalars; with ``vectors`` also the per-layer vector sums)."""
    files = part_files(out)
    index = {str(f): i for i, f in enumerate(files)}
    frames: list[pd.DataFrame] = []
    layers: dict[tuple[str, int], LayerStats] = {}
    cols = SCALARS + (_VECTORS if vectors else [])
    for module, layer, path, t in iter_parts(out, cols):
        if t.num_rows == 0:
            continue
        st = layers.setdefault((module, layer), LayerStats(module, layer))
        st.rows += t.num_rows
        df = t.select(SCALARS).to_pandas()
        feats = df["feature"].to_numpy(np.int64)
        if vectors:
            _add_vectors(st, t, feats)
        df.insert(0, "layer", np.int32(layer))
        df.insert(0, "module", module)
        df["frag"] = np.int32(index[str(path)])
        frames.append(df)
    if frames:
        rows = pd.concat(frames, ignore_index=True)
        rows["module"] = rows["module"].astype("category")
        rows["image"] = rows["image"].astype("category")
        for c in ("query", "image_h", "image_w", "input_h", "input_w", "stride"):
            rows[c] = rows[c].astype("Int32")
    else:
        rows = pd.DataFrame(columns=["module", "layer", *SCALARS, "frag"])
    return Scan(rows=rows, layers=layers, files=files)
