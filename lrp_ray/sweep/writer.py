"""Parquet dataset ``OUT/relevance`` (hive-partitioned by module and layer) and atomic file writes.

The driver is the only writer. Every file is written to a hidden temp name in its final folder and
renamed into place, so a file that exists is complete; pyarrow skips names starting with ``.``/``_``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["SCHEMA", "result_to_table", "write_part", "done_keys", "clean_temp_files", "atomic_write_text",
           "atomic_path", "OWNED_NAMES", "clear_outputs"]

SCHEMA = pa.schema([
    ("image", pa.string()),
    ("image_h", pa.int32()),
    ("image_w", pa.int32()),
    ("feature", pa.int32()),
    ("query", pa.int32()),
    ("act_sum", pa.float64()),
    ("act_max", pa.float64()),
    ("act_mean", pa.float64()),
    ("relevance_total", pa.float64()),
    ("input_relevance", pa.float64()),
    ("bias_relevance", pa.float64()),
    ("token_map", pa.list_(pa.float32())),
    ("grid_h", pa.int32()),
    ("grid_w", pa.int32()),
    ("channel_relevance", pa.list_(pa.float32())),
    ("profile", pa.list_(pa.float64())),
    ("rules", pa.string()),
    ("epsilon", pa.float64()),
    ("precision", pa.string()),
])
"""Columns of a part file (``module`` and ``layer`` come from the folder names)."""

OWNED_NAMES = ("relevance", "summary.csv", "errors.csv", "manifest.json", "heatmaps", "report.html", "_cache")
"""What a sweep writes in OUT (and ``--overwrite`` deletes); anything else there is left alone."""


def _list_column(blocks: Sequence[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """A list array from 2-D blocks (rows x values), blocks may differ in width."""
    lengths = np.concatenate([np.full(b.shape[0], b.shape[1], dtype=np.int64) for b in blocks])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.ascontiguousarray(b).reshape(-1) for b in blocks])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=dtype))


def result_to_table(res: Any, image_names: Sequence[str], image_sizes: Sequence[tuple[int, int]]) -> pa.Table:
    """Rows (image-major, then target) of a ``RelevanceResult`` in the :data:`SCHEMA` layout."""
    b, n = res.queries.shape
    if len(image_names) != b:
        raise ValueError(f"{len(image_names)} image names for {b} images")
    valid = np.asarray(res.valid_hw).astype(np.int64)
    token_blocks = [np.asarray(res.token_maps[i, :, :valid[i, 0], :valid[i, 1]], dtype=np.float32)
                    .reshape(n, -1) for i in range(b)]
    chan = np.asarray(res.channel_relevance, dtype=np.float32).reshape(b * n, -1)
    prof = np.asarray(res.profile, dtype=np.float64).reshape(b * n, -1)
    q = np.asarray(res.queries).reshape(-1).astype(np.int32)
    rows = b * n
    sizes = np.asarray(image_sizes, dtype=np.int32).reshape(b, 2)
    columns = {
        "image": pa.array(np.repeat(np.asarray(list(image_names), dtype=object), n), pa.string()),
        "image_h": pa.array(np.repeat(sizes[:, 0], n), pa.int32()),
        "image_w": pa.array(np.repeat(sizes[:, 1], n), pa.int32()),
        "feature": pa.array(np.tile(np.asarray(res.features, dtype=np.int32), b), pa.int32()),
        "query": pa.array(q, pa.int32(), mask=q < 0),
        "act_sum": pa.array(np.asarray(res.act_sum, dtype=np.float64).reshape(-1)),
        "act_max": pa.array(np.asarray(res.act_max, dtype=np.float64).reshape(-1)),
        "act_mean": pa.array(np.asarray(res.act_mean, dtype=np.float64).reshape(-1)),
        "relevance_total": pa.array(np.asarray(res.target_relevance, dtype=np.float64).reshape(-1)),
        "input_relevance": pa.array(np.asarray(res.input_relevance, dtype=np.float64).reshape(-1)),
        "bias_relevance": pa.array(np.asarray(res.bias_relevance, dtype=np.float64).reshape(-1)),
        "token_map": _list_column(token_blocks, pa.float32()),
        "grid_h": pa.array(np.repeat(valid[:, 0], n).astype(np.int32), pa.int32()),
        "grid_w": pa.array(np.repeat(valid[:, 1], n).astype(np.int32), pa.int32()),
        "channel_relevance": _list_column([chan], pa.float32()),
        "profile": _list_column([prof], pa.float64()),
        "rules": pa.array([str(res.rules)] * rows, pa.string()),
        "epsilon": pa.array(np.full(rows, float(res.epsilon))),
        "precision": pa.array([str(res.precision)] * rows, pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success rename it to ``final``, on any error (disk full,
    read-only folder, ...) remove it and re-raise: a file that exists at ``final`` is always complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_part(dataset: Path, relpath: str, table: pa.Table) -> Path:
    """Write ``table`` to ``dataset/relpath`` atomically (see :func:`atomic_path`); returns the path."""
    final = dataset / relpath
    with atomic_path(final) as tmp:
        pq.write_table(table.cast(SCHEMA), tmp, compression="zstd")
    return final


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def done_keys(dataset: Path) -> set[str]:
    """``module=<m>/layer=<l>/part-<key>.parquet`` paths already written (finished work items)."""
    if not dataset.is_dir():
        return set()
    return {p.relative_to(dataset).as_posix() for p in dataset.glob("module=*/layer=*/part-*.parquet")}


def clean_temp_files(dataset: Path) -> int:
    """Remove temp files an interrupted run left behind; returns how many."""
    n = 0
    if dataset.is_dir():
        for p in dataset.glob("module=*/layer=*/.part-*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def clear_outputs(out: Path) -> None:
    """Delete what an earlier sweep wrote into ``out`` (:data:`OWNED_NAMES` only)."""
    for name in OWNED_NAMES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
