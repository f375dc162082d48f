"""Writing ``OUT/relevance`` (hive-partitioned by module and layer): parts, resume listing, cleanup.

The driver is the only writer. Every file is written to a hidden temp name in its final folder and
renamed into place, so a file that exists is complete; readers skip names starting with ``.``/``_``.
The row format (:data:`SCHEMA`, :func:`result_to_table`) and the atomic helpers live in
:mod:`lrp_ray.results` and are re-exported here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lrp_ray.results import PART_GLOB, SCHEMA, atomic_path, atomic_write_text, result_to_table
from lrp_ray.results.detections import BY_CLASS_NAME, BY_CLASS_PARQUET, DETECTION_DATASETS, ROWS_KEY
from lrp_ray.results.pixels import PIXEL_SCHEMA, PIXELS_DIR

__all__ = ["SCHEMA", "result_to_table", "write_part", "done_keys", "clean_temp_files", "atomic_write_text",
           "atomic_path", "OWNED_NAMES", "clear_outputs", "schema_of", "dataset_names", "ROWS_KEY"]

OWNED_NAMES = ("relevance", *DETECTION_DATASETS, PIXELS_DIR, BY_CLASS_NAME, BY_CLASS_PARQUET, "summary.csv",
               "summary.parquet", "errors.csv", "manifest.json", "heatmaps", "report.html", "atlas", "_cache")
"""What a sweep writes in OUT (and ``--overwrite`` deletes); anything else there is left alone."""


def schema_of(dataset: str) -> pa.Schema:
    """The part schema of ``OUT/<dataset>``."""
    if dataset == "relevance":
        return SCHEMA
    if dataset == PIXELS_DIR:
        return PIXEL_SCHEMA
    return DETECTION_DATASETS[dataset]


def dataset_names(out: Path) -> list[str]:
    """The datasets a sweep may have written into ``out``."""
    return ["relevance", *DETECTION_DATASETS, PIXELS_DIR]


def write_part(dataset: Path, relpath: str, table: pa.Table, schema: pa.Schema = SCHEMA) -> Path:
    """Write ``table`` to ``dataset/relpath`` atomically (see :func:`atomic_path`); returns the path."""
    final = dataset / relpath
    with atomic_path(final) as tmp:
        pq.write_table(table.cast(schema.with_metadata(table.schema.metadata)), tmp, compression="zstd")
    return final


def done_keys(dataset: Path) -> set[str]:
    """``module=<m>/layer=<l>/part-<key>-<digest>.parquet`` paths already written (finished work items;
    a work item's path carries its request's digest, so parts of other requests never match)."""
    if not dataset.is_dir():
        return set()
    return {p.relative_to(dataset).as_posix() for p in dataset.glob(PART_GLOB)}


def clean_temp_files(dataset: Path) -> int:
    """Remove temp files an interrupted run left behind; returns how many."""
    n = 0
    if dataset.is_dir():
        for p in [*dataset.glob("module=*/layer=*/.part-*.tmp-*"), *dataset.glob(".part-*.tmp-*")]:
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
