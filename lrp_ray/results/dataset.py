"""Reading ``OUT/relevance``: the complete part files, as one pyarrow dataset or one pandas frame.

Only ``module=<m>/layer=<l>/part-*.parquet`` files count (temp files of an unfinished write start with
``.`` and are never read). Parts written by an older version read with the current columns: what they
lack is null.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .schema import CONSERVATION_PARTS, FRAME_COLUMNS, FRAME_SCHEMA, PARTITION_SCHEMA, table_to_frame

__all__ = ["DATASET_NAME", "PART_GLOB", "relevance_dir", "part_files", "partitions", "dataset",
           "load_table", "load", "read_parts", "iter_parts", "conservation_residual", "conservation"]

DATASET_NAME = "relevance"
PART_GLOB = "module=*/layer=*/part-*.parquet"

Filters = pc.Expression | Sequence[Any] | None
"""A pyarrow expression, or pandas/pyarrow DNF filters like ``[("feature", "in", [0, 3])]``."""


def relevance_dir(out: str | Path) -> Path:
    """The dataset folder of a results folder (``out/relevance``); ``out`` itself if it is one."""
    p = Path(out)
    return p / DATASET_NAME if (p / DATASET_NAME).is_dir() or not p.is_dir() else p


def part_files(out: str | Path) -> list[Path]:
    """The complete part files of a results folder (or its dataset folder), sorted. Where the folder's
    manifest names its request (``spec_hash``), only that request's parts count (their names end with
    it): parts another request left there are never read."""
    root = relevance_dir(out)
    if not root.is_dir():
        return []
    files = sorted(root.glob(PART_GLOB))
    tag = _request_tag(root)
    return [f for f in files if f.name.endswith(f"-{tag}.parquet")] if tag else files


def _request_tag(root: Path) -> str | None:
    from .manifest import read_manifest

    manifest = read_manifest(root.parent) if root.name == DATASET_NAME else None
    if manifest is None or manifest.version < 2 or not manifest.spec_hash:
        return None
    return manifest.spec_hash


def _keys(path: Path) -> tuple[str, int]:
    layer_dir = path.parent
    return layer_dir.parent.name.split("=", 1)[1], int(layer_dir.name.split("=", 1)[1])


def partitions(out: str | Path) -> dict[tuple[str, int], list[Path]]:
    """Part files per (module, layer): encoder first, then decoder, then others; layers ascending."""
    groups: dict[tuple[str, int], list[Path]] = {}
    for f in part_files(out):
        try:
            groups.setdefault(_keys(f), []).append(f)
        except ValueError:  # e.g. layer=x: not a folder the sweep writes
            continue
    order = {"encoder": 0, "decoder": 1}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0][0], kv[0][1])))


def dataset(out: str | Path, files: Sequence[Path] | None = None) -> ds.Dataset:
    """A pyarrow dataset over the part files (all, or ``files``) with the :data:`FRAME_SCHEMA` columns."""
    root = relevance_dir(out)
    paths = [str(f) for f in (part_files(root) if files is None else files)]
    return ds.dataset(paths, schema=FRAME_SCHEMA, format="parquet", partition_base_dir=str(root),
                      partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"))


def _expression(filters: Filters) -> pc.Expression | None:
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    return pq.filters_to_expression(list(filters))


def _columns(columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return list(FRAME_COLUMNS)
    unknown = [c for c in columns if c not in FRAME_COLUMNS]
    if unknown:
        raise ValueError(f"unknown result columns {unknown}; valid: {', '.join(FRAME_COLUMNS)}")
    return list(columns)


def load_table(out: str | Path, columns: Sequence[str] | None = None, filters: Filters = None) -> pa.Table:
    """Rows of a results folder as an Arrow table (only ``columns``; only rows matching ``filters``)."""
    cols = _columns(columns)
    files = part_files(out)
    if not files:
        return pa.schema([FRAME_SCHEMA.field(c) for c in cols]).empty_table()
    return dataset(out, files).to_table(columns=cols, filter=_expression(filters))


def load(out: str | Path, columns: Sequence[str] | None = None, filters: Filters = None) -> pd.DataFrame:
    """Rows of a results folder as one frame: ``module``, ``layer`` and the :data:`SCHEMA` columns.

    ``columns`` projects (only those columns are read); ``filters`` is a pyarrow expression or DNF list,
    e.g. ``[("module", "=", "encoder"), ("feature", "in", [0, 3])]``. Same columns and dtypes as
    :func:`lrp_ray.api.explain`'s frames.
    """
    return table_to_frame(load_table(out, columns, filters))


def read_parts(files: Sequence[Path], columns: Sequence[str] | None = None, filters: Filters = None
               ) -> pa.Table:
    """Rows of some part files (``columns`` only, rows matching ``filters``), in the current schema:
    columns an older part lacks are null. ``module``/``layer`` come from the files' folders."""
    cols = _columns(columns)
    if not files:
        return pa.schema([FRAME_SCHEMA.field(c) for c in cols]).empty_table()
    return dataset(Path(files[0]).parents[2], files).to_table(columns=cols, filter=_expression(filters))


def iter_parts(out: str | Path, columns: Sequence[str] | None = None
               ) -> Iterator[tuple[str, int, Path, pa.Table]]:
    """``(module, layer, path, table)`` per part file, in :func:`partitions` order (bounded memory)."""
    cols = [c for c in _columns(columns) if c not in PARTITION_SCHEMA.names]
    for (module, layer), files in partitions(out).items():
        for f in files:
            yield module, layer, f, read_parts([f], cols)


def conservation_residual(rows: pd.DataFrame | pa.Table) -> np.ndarray:
    """``relevance_total - (input + bias + pos + softmax relevance)`` per row (NaN where a part is null)."""
    if isinstance(rows, pa.Table):
        get = lambda c: rows.column(c).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    else:
        get = lambda c: pd.to_numeric(rows[c]).to_numpy(dtype=np.float64, na_value=np.nan)  # noqa: E731
    return get("relevance_total") - sum(get(c) for c in CONSERVATION_PARTS)


CONSERVATION_COLUMNS = ["module", "layer", "rows", "rows_unchecked", "max_abs_total", "max_abs_error",
                        "rel_error"]


def conservation(out: str | Path) -> pd.DataFrame:
    """Relevance accounting per module/layer, from the outputs alone.

    ``max_abs_error`` = max over rows of ``|relevance_total - (input + bias + pos + softmax)|``;
    ``rel_error`` = that over ``max_abs_total`` (the largest ``|relevance_total|``). Zero up to rounding
    for epsilon 0; the epsilon rule absorbs a little otherwise. ``rows_unchecked``: rows without
    ``pos_relevance``/``softmax_relevance`` (version-1 outputs); ``rel_error`` is NaN if none is checked.
    """
    cols = ["relevance_total", *CONSERVATION_PARTS]
    acc: dict[tuple[str, int], list[float]] = {}
    for module, layer, _, table in iter_parts(out, cols):
        res = conservation_residual(table)
        total = np.abs(table.column("relevance_total").to_numpy(zero_copy_only=False).astype(np.float64))
        ok = np.isfinite(res)
        a = acc.setdefault((module, layer), [0, 0, 0.0, 0.0])
        a[0] += len(res)
        a[1] += int((~ok).sum())
        if ok.any():
            a[2] = max(a[2], float(np.nanmax(total[ok])))
            a[3] = max(a[3], float(np.abs(res[ok]).max()))
    rows = []
    for (module, layer), (n, unchecked, tot, err) in acc.items():
        checked = n > unchecked
        rel = (err / tot if tot > 0 else (0.0 if err == 0 else np.inf)) if checked else np.nan
        rows.append({"module": module, "layer": layer, "rows": n, "rows_unchecked": unchecked,
                     "max_abs_total": tot if checked else np.nan, "max_abs_error": err if checked else np.nan,
                     "rel_error": rel})
    return pd.DataFrame(rows, columns=CONSERVATION_COLUMNS)
