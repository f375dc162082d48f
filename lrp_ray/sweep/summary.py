"""``summary.csv`` and ``errors.csv`` from the Parquet dataset (read one module/layer at a time).

summary.csv has one row per module/layer/feature (statistics over all rows: images, and for the decoder
each selected query):

- ``n_rows``, ``n_images``;
- ``relevance_mean``/``relevance_std``: ``relevance_total`` (relevance at the target);
- ``input_relevance_mean``/``input_relevance_std``: relevance that reaches the encoder input;
- ``activation_mean``/``activation_std``: ``act_mean``; ``activation_max_mean``: mean of ``act_max``;
- ``top5_images_by_activation`` (by ``act_mean``), ``top5_images_by_relevance`` (by ``input_relevance``):
  lists of image names, best first (an image counts once, with its best row);
- ``top10_channels``: list of the input channels with the largest mean ``channel_relevance``.

``summary.parquet`` stores the lists as lists; ``summary.csv`` (for spreadsheets) writes them as JSON
arrays, unambiguous whatever a name holds. In both CSV files a text cell that a spreadsheet would run as
a formula (leading ``=``, ``+``, ``-``, ``@``, tab or CR) is prefixed with ``'``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_ray.results import atomic_path, atomic_write_text, partitions, read_parts

__all__ = ["write_summary", "write_errors", "summarize_partition", "write_detection_summary",
           "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["module", "layer", "feature", "n_rows", "n_images", "relevance_mean", "relevance_std",
                   "input_relevance_mean", "input_relevance_std", "activation_mean", "activation_std",
                   "activation_max_mean", "top5_images_by_activation", "top5_images_by_relevance",
                   "top10_channels"]

_COLS = ["image", "feature", "act_mean", "act_max", "relevance_total", "input_relevance", "channel_relevance"]


class _Moments:
    """Count, mean and M2 per feature, merged chunk by chunk (Chan et al.), for a streaming mean/std."""

    def __init__(self) -> None:
        self.n = pd.Series(dtype=np.float64)
        self.mean = pd.Series(dtype=np.float64)
        self.m2 = pd.Series(dtype=np.float64)

    def add(self, values: pd.Series, keys: pd.Series) -> None:
        g = values.groupby(keys.values)
        n_b, mean_b = g.count().astype(np.float64), g.mean()
        m2_b = g.var(ddof=0).fillna(0.0) * n_b
        idx = self.n.index.union(n_b.index)
        n_a = self.n.reindex(idx, fill_value=0.0)
        mean_a = self.mean.reindex(idx, fill_value=0.0)
        m2_a = self.m2.reindex(idx, fill_value=0.0)
        n_b, mean_b, m2_b = (x.reindex(idx, fill_value=0.0) for x in (n_b, mean_b, m2_b))
        n = n_a + n_b
        delta = mean_b - mean_a
        safe_n = n.where(n > 0, 1.0)
        self.mean = mean_a + delta * n_b / safe_n
        self.m2 = m2_a + m2_b + delta ** 2 * n_a * n_b / safe_n
        self.n = n

    def std(self) -> pd.Series:
        return np.sqrt(self.m2 / self.n.where(self.n > 0, 1.0))


def _top(best: pd.Series, feature: int, k: int) -> list[str]:
    s = best.loc[feature].sort_index().sort_values(ascending=False, kind="stable")
    return [str(v) for v in s.index[:k]]


LIST_COLUMNS = ("top5_images_by_activation", "top5_images_by_relevance", "top10_channels")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """A text cell that a spreadsheet would not run as a formula (numbers pass unchanged)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_text(frame: pd.DataFrame) -> str:
    out = frame.copy()
    for c in out.columns:
        if c in LIST_COLUMNS:
            out[c] = out[c].map(lambda v: json.dumps(list(v), ensure_ascii=False))
        elif out[c].dtype == object:
            out[c] = out[c].map(csv_safe)
    return out.to_csv(index=False)


_CHUNK_BYTES = 64 << 20
"""Part files are read together until their columns reach this many bytes (memory stays bounded; many
small part files, e.g. one image per batch, cost one pass instead of one pass each)."""


def _chunks(files: list[Path], limit: int | None = None) -> Iterator[pa.Table]:
    """Tables of consecutive part files (``_COLS`` only), each about ``limit`` bytes at most."""
    limit = _CHUNK_BYTES if limit is None else limit
    pending: list[pa.Table] = []
    size = 0
    for f in sorted(files):
        table = read_parts([f], _COLS)
        if table.num_rows == 0:
            continue
        pending.append(table)
        size += table.nbytes
        if size >= limit:
            yield pa.concat_tables(pending)
            pending, size = [], 0
    if pending:
        yield pa.concat_tables(pending)


def summarize_partition(files: list[Path], module: str, layer: int) -> pd.DataFrame:
    """Summary rows of one module/layer, reading its part files a bounded chunk at a time."""
    moments = {c: _Moments() for c in ("relevance_total", "input_relevance", "act_mean", "act_max")}
    best_act: list[pd.Series] = []
    best_rel: list[pd.Series] = []
    images: dict[int, set] = {}
    chan_sum: dict[int, np.ndarray] = {}
    for table in _chunks(files):
        chan = table.column("channel_relevance").combine_chunks()
        width = len(chan[0])
        flat = chan.flatten().to_numpy(zero_copy_only=False)
        chan_np = np.asarray(flat, dtype=np.float64).reshape(-1, width)
        df = table.drop(["channel_relevance"]).to_pandas()
        for c, m in moments.items():
            m.add(df[c], df["feature"])
        best_act.append(df.groupby(["feature", "image"])["act_mean"].max())
        best_rel.append(df.groupby(["feature", "image"])["input_relevance"].max())
        for feature, idx in df.groupby("feature").indices.items():
            feature = int(feature)
            images.setdefault(feature, set()).update(df["image"].iloc[idx])
            part = chan_np[idx].sum(0)
            chan_sum[feature] = part if feature not in chan_sum else chan_sum[feature] + part
        # keep the per-(feature, image) maxima small as chunks accumulate
        best_act = [pd.concat(best_act).groupby(level=[0, 1]).max()]
        best_rel = [pd.concat(best_rel).groupby(level=[0, 1]).max()]
    if not chan_sum:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    act, rel = best_act[0], best_rel[0]
    mean = {c: m.mean for c, m in moments.items()}
    std = {c: m.std() for c, m in moments.items()}
    rows = []
    for feature in sorted(chan_sum):
        n = float(moments["act_mean"].n.loc[feature])
        mean_chan = chan_sum[feature] / n
        rows.append({
            "module": module, "layer": int(layer), "feature": feature, "n_rows": int(n),
            "n_images": len(images[feature]),
            "relevance_mean": mean["relevance_total"].loc[feature],
            "relevance_std": std["relevance_total"].loc[feature],
            "input_relevance_mean": mean["input_relevance"].loc[feature],
            "input_relevance_std": std["input_relevance"].loc[feature],
            "activation_mean": mean["act_mean"].loc[feature],
            "activation_std": std["act_mean"].loc[feature],
            "activation_max_mean": mean["act_max"].loc[feature],
            "top5_images_by_activation": _top(act, feature, 5),
            "top5_images_by_relevance": _top(rel, feature, 5),
            "top10_channels": [int(c) for c in np.argsort(-mean_chan, kind="stable")[:10]],
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def write_summary(out: Path) -> pd.DataFrame:
    """Write ``out/summary.csv`` from ``out/relevance``; returns the summary frame."""
    frames = [summarize_partition(files, module, layer) for (module, layer), files in partitions(out).items()]
    frames = [f for f in frames if len(f)]
    summary = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)
    order = {"encoder": 0, "decoder": 1}
    if len(summary):
        summary = summary.sort_values(["module", "layer", "feature"], key=lambda s: s.map(order) if s.name ==
                                      "module" else s, kind="stable").reset_index(drop=True)
    with atomic_path(out / "summary.parquet") as tmp:
        pq.write_table(pa.Table.from_pandas(summary, preserve_index=False), tmp)
    atomic_write_text(out / "summary.csv", _csv_text(summary))
    return summary


def write_errors(out: Path, errors: list) -> None:
    """``out/errors.csv``: one row per image that could not be used (``image``, ``reason``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "reason"])
    for e in errors:
        w.writerow([csv_safe(e.name), csv_safe(e.reason)])
    atomic_write_text(out / "errors.csv", buf.getvalue())


def write_detection_summary(out: Path, top_k: int) -> dict[str, Any]:
    """``out/concepts_by_class.csv`` from ``out/concepts`` (one part at a time), and the detection counts
    for the manifest: detections explained, per class, images without one, pointing game and deletion
    areas when faithfulness was computed."""
    from lrp_ray.results.detections import (
        BY_CLASS_NAME,
        BY_CLASS_PARQUET,
        concepts_by_class,
        detection_dataset_files,
        load_detections,
        no_detection_images,
        read_faithfulness,
    )

    cols = ["image", "query", "class_id", "class_name", "module", "layer", "feature", "relevance", "share"]
    frames = (pq.read_table(f, columns=cols).to_pandas() for f in detection_dataset_files(out, "concepts"))
    by_class = concepts_by_class(frames, top_k)
    atomic_write_text(out / BY_CLASS_NAME, by_class.map(csv_safe).to_csv(index=False))
    with atomic_path(out / BY_CLASS_PARQUET) as tmp:  # the exact values (names without the CSV guard)
        pq.write_table(pa.Table.from_pandas(by_class, preserve_index=False), tmp)
    dets = load_detections(out, columns=["image", "class_id", "class_name"])
    empty = sorted(no_detection_images(out))
    info: dict[str, Any] = {"detections": 0 if dets is None else len(dets),
                            "images_without_detections": len(empty), "no_detection_images": empty,
                            "by_class_rows": len(by_class)}
    if dets is not None and len(dets):
        names = dets["class_name"].fillna(dets["class_id"].astype(str))
        info["per_class"] = {str(k): int(v) for k, v in names.value_counts().sort_index().items()}
    faith = read_faithfulness(out)
    if faith is not None and len(faith):
        info["pointing_game"] = float(faith["pointing_hit"].mean())
        info["auc_relevance_mean"] = float(faith["auc_relevance"].mean())
        info["auc_random_mean"] = float(faith["auc_random"].mean())
    return info
