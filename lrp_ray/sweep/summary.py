"""``summary.csv`` and ``errors.csv`` from the Parquet dataset (read one module/layer at a time).

summary.csv has one row per module/layer/feature (statistics over all rows: images, and for the decoder
each selected query):

- ``n_rows``, ``n_images``;
- ``relevance_mean``/``relevance_std``: ``relevance_total`` (relevance at the target);
- ``input_relevance_mean``/``input_relevance_std``: relevance that reaches the encoder input;
- ``activation_mean``/``activation_std``: ``act_mean``; ``activation_max_mean``: mean of ``act_max``;
- ``top5_images_by_activation`` (by ``act_mean``), ``top5_images_by_relevance`` (by ``input_relevance``):
  image names joined by ``|``, best first (an image counts once, with its best row);
- ``top10_channels``: input channels with the largest mean ``channel_relevance``, joined by ``|``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .writer import atomic_write_text

__all__ = ["write_summary", "write_errors", "summarize_partition", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["module", "layer", "feature", "n_rows", "n_images", "relevance_mean", "relevance_std",
                   "input_relevance_mean", "input_relevance_std", "activation_mean", "activation_std",
                   "activation_max_mean", "top5_images_by_activation", "top5_images_by_relevance",
                   "top10_channels"]

_COLS = ["image", "feature", "act_mean", "act_max", "relevance_total", "input_relevance", "channel_relevance"]


def _top_images(df: pd.DataFrame, col: str, k: int = 5) -> str:
    best = df.groupby("image", sort=False)[col].max().sort_values(ascending=False, kind="stable")
    return "|".join(best.index[:k].astype(str))


def summarize_partition(files: list[Path], module: str, layer: int) -> pd.DataFrame:
    """Summary rows of one module/layer from its part files."""
    tables = [pq.read_table(f, columns=_COLS) for f in sorted(files)]
    if not tables:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    import pyarrow as pa

    table = pa.concat_tables(tables)
    chan = table.column("channel_relevance").combine_chunks()
    width = len(chan[0]) if len(chan) else 0
    chan_np = np.asarray(chan.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, width) \
        if width else np.zeros((len(chan), 0))
    df = table.drop(["channel_relevance"]).to_pandas()
    rows = []
    for feature, idx in df.groupby("feature", sort=True).indices.items():
        g = df.iloc[idx]
        mean_chan = chan_np[idx].mean(0) if width else np.zeros(0)
        top_ch = np.argsort(-mean_chan, kind="stable")[:10]
        rows.append({
            "module": module, "layer": int(layer), "feature": int(feature), "n_rows": len(g),
            "n_images": int(g["image"].nunique()),
            "relevance_mean": g["relevance_total"].mean(), "relevance_std": g["relevance_total"].std(ddof=0),
            "input_relevance_mean": g["input_relevance"].mean(),
            "input_relevance_std": g["input_relevance"].std(ddof=0),
            "activation_mean": g["act_mean"].mean(), "activation_std": g["act_mean"].std(ddof=0),
            "activation_max_mean": g["act_max"].mean(),
            "top5_images_by_activation": _top_images(g, "act_mean"),
            "top5_images_by_relevance": _top_images(g, "input_relevance"),
            "top10_channels": "|".join(str(int(c)) for c in top_ch),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def write_summary(out: Path) -> pd.DataFrame:
    """Write ``out/summary.csv`` from ``out/relevance``; returns the summary frame."""
    dataset = out / "relevance"
    frames = []
    for mdir in sorted(dataset.glob("module=*")):
        module = mdir.name.split("=", 1)[1]
        ldirs = sorted(mdir.glob("layer=*"), key=lambda p: int(p.name.split("=", 1)[1]))
        for ldir in ldirs:
            files = sorted(ldir.glob("part-*.parquet"))
            if files:
                frames.append(summarize_partition(files, module, int(ldir.name.split("=", 1)[1])))
    frames = [f for f in frames if len(f)]
    summary = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)
    order = {"encoder": 0, "decoder": 1}
    if len(summary):
        summary = summary.sort_values(["module", "layer", "feature"], key=lambda s: s.map(order) if s.name ==
                                      "module" else s, kind="stable").reset_index(drop=True)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    return summary


def write_errors(out: Path, errors: list) -> None:
    """``out/errors.csv``: one row per image that could not be used (``image``, ``reason``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "reason"])
    for e in errors:
        w.writerow([e.name, e.reason])
    atomic_write_text(out / "errors.csv", buf.getvalue())
