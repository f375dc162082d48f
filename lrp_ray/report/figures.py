"""The run page's figures (matplotlib, PNG data URIs): timings, conservation by layer, per-layer channel
matrix and profile, deletion curves."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lrp_ray.viz.heatmaps import CMAP  # noqa: E402

from .scan import LayerStats  # noqa: E402

__all__ = ["png_uri", "timings_figure", "conservation_figure", "matrix_figure", "profile_figure",
           "deletion_figure"]

DPI = 100


def png_uri(fig: Any) -> str:
    """The figure as a PNG ``data:`` URI (the figure is closed)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


WALL = ("discover", "model_load", "validate_images", "prepare", "ray_start", "plan", "sweep", "summary",
        "heatmaps", "total")
SUMMED = ("decode", "forward", "cache_import", "propagation", "result_tables", "writing")


def timings_figure(timings: dict[str, float]) -> Any | None:
    """Horizontal bars: the driver's wall-clock steps, then the work summed over items and actors."""
    items = [(k, float(v)) for k, v in timings.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    if not items:
        return None
    order = {k: i for i, k in enumerate((*WALL, *SUMMED))}
    items.sort(key=lambda kv: (kv[0] in SUMMED, order.get(kv[0], 99), kv[0]))
    labels = [k + (" (summed)" if k in SUMMED else "") for k, _ in items]
    vals = [v for _, v in items]
    colors = ["#c44e52" if k == "total" else "#8172b2" if k in SUMMED else "#4c72b0" for k, _ in items]
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(items) + 0.8), dpi=DPI, layout="constrained")
    y = np.arange(len(items))
    ax.barh(y, vals, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    top = max(vals) if vals else 1.0
    for yi, v in zip(y, vals, strict=True):
        ax.text(v + top * 0.01, yi, f"{v:.3g} s", va="center", fontsize=7)
    ax.set_xlim(0, top * 1.15 or 1.0)
    return fig


def conservation_figure(layers: Sequence[LayerStats], rel_errors: dict[tuple[str, int], float]) -> Any | None:
    """Per layer (one bar group each, so 1 or 12 layers read the same): where the target relevance went
    (input tokens, biases, positions, softmax; fractions of the summed target relevance) and the
    relative accounting error."""
    if not layers:
        return None
    parts = [("input_relevance", "input tokens", "#4c72b0"), ("bias_relevance", "biases", "#dd8452"),
             ("pos_relevance", "positional", "#55a868"), ("softmax_relevance", "softmax", "#8172b2")]
    labels = [f"{st.module[:3]} {st.layer}" for st in layers]
    x = np.arange(len(layers))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(7.0, 3.5 + 0.5 * len(layers)), 3.0), dpi=DPI,
                                  layout="constrained", gridspec_kw={"width_ratios": [3, 2]})
    bottom_pos, bottom_neg = np.zeros(len(layers)), np.zeros(len(layers))
    for col, name, color in parts:
        frac = np.array([st.parts_sum.get(col, 0.0) / st.parts_sum["relevance_total"]
                         if st.parts_sum.get("relevance_total") else 0.0 for st in layers])
        frac = np.nan_to_num(frac)
        base = np.where(frac >= 0, bottom_pos, bottom_neg)
        ax.bar(x, frac, bottom=base, color=color, label=name, width=0.7)
        bottom_pos += np.clip(frac, 0, None)
        bottom_neg += np.clip(frac, None, 0)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_xticks(x, labels, rotation=45 if len(layers) > 6 else 0, fontsize=8)
    ax.set_ylabel("share of target relevance")
    ax.set_title("where the relevance went (summed over rows)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    errs = np.array([rel_errors.get((st.module, st.layer), np.nan) for st in layers], dtype=float)
    shown = np.where(np.isfinite(errs), np.maximum(errs, 1e-17), np.nan)
    ax2.scatter(x, shown, color="#c44e52", zorder=3)
    ax2.set_yscale("log")
    ax2.set_xticks(x, labels, rotation=45 if len(layers) > 6 else 0, fontsize=8)
    ax2.set_xlim(-0.7, len(layers) - 0.3)
    ax2.set_title("max |total - parts| / max |total|", fontsize=9)
    ax2.grid(True, axis="y", lw=0.4, alpha=0.6)
    return fig


def matrix_figure(st: LayerStats, features: Sequence[int]) -> Any:
    mat = np.stack([st.channel_sum[f] / max(st.channel_n[f], 1) for f in features])
    lim = float(np.nanmax(np.abs(mat))) if mat.size else 1.0
    lim = lim if lim > 0 and math.isfinite(lim) else 1.0
    nf, d = mat.shape
    fig, ax = plt.subplots(figsize=(min(11.0, max(5.0, 2.0 + d * 0.03)), min(9.0, max(2.4, 1.3 + nf * 0.16))),
                           dpi=DPI, layout="constrained")
    im = ax.imshow(mat, cmap=CMAP, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("input channel (encoder input, after input_proj)")
    ax.set_ylabel("feature")
    if nf <= 40:
        ax.set_yticks(range(nf), [str(f) for f in features], fontsize=7)
    ax.set_title(f"{st.module} layer {st.layer}: mean channel relevance (feature x input channel)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.9)
    return fig


def profile_figure(st: LayerStats, names: Sequence[str] | None) -> Any:
    assert st.profile_sum is not None and st.profile_frac_sum is not None
    p = len(st.profile_sum)
    frac = st.profile_frac_sum / max(st.profile_n, 1)
    mean = st.profile_sum / max(st.profile_n, 1)
    labels = list(names) if names is not None and len(names) == p else [str(i) for i in range(p)]
    fig, ax = plt.subplots(figsize=(min(11.0, max(6.5, 3.0 + 0.35 * p)), 3.2), dpi=DPI, layout="constrained")
    ax.plot(range(p), frac, marker="o", lw=1.5, label="mean over rows of stage relevance / target")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(p), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of target")
    ax.set_title(f"{st.module} layer {st.layer}: relevance kept at each stage (mean at the input "
                 f"{mean[-1]:.3g})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


def deletion_figure(fractions: np.ndarray, rel: np.ndarray, rand: np.ndarray, n: int) -> Any:
    """Mean deletion curves (relevance order vs random order)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.0), dpi=DPI, layout="constrained")
    ax.plot(fractions, rel, marker=".", label="tokens deleted by relevance", color="#c44e52")
    ax.plot(fractions, rand, marker=".", label="random order", color="#4c72b0")
    ax.set_xlabel("fraction of tokens deleted")
    ax.set_ylabel("class logit (1 = unchanged)")
    ax.set_title(f"deletion curves, mean over {n} detections", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, lw=0.4, alpha=0.6)
    return fig
