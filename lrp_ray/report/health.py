"""What is missing or inconsistent in a results folder: the banner of the run page and the atlas.

Checks only what the folder itself says: the manifest's status and counts, failed work items, errors.csv,
layers the request named but the dataset lacks, features with fewer images than the run, duplicate rows
(same module, layer, feature, image and query) and image files that cannot be found.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lrp_ray.results import Manifest

__all__ = ["Problem", "Health", "check", "read_errors"]


@dataclass
class Problem:
    """One line of the banner, with optional details (shown folded)."""

    text: str
    details: list[str] = field(default_factory=list)
    level: str = "warn"  # "warn" | "error"


@dataclass
class Health:
    problems: list[Problem] = field(default_factory=list)
    duplicates: int = 0
    incomplete_features: set[tuple[str, int, int]] = field(default_factory=set)

    def add(self, text: str, details: list[str] | None = None, level: str = "warn") -> None:
        self.problems.append(Problem(text, list(details or []), level))


def read_errors(out: Path, limit: int = 100_000) -> list[tuple[str, str]]:
    """``errors.csv`` as (image, reason) pairs (empty when absent or unreadable)."""
    p = out / "errors.csv"
    if not p.is_file():
        return []
    try:
        with p.open(newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.reader(f))
    except OSError:
        return []
    body = rows[1:limit + 1] if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "reason"] \
        else rows[:limit]
    return [(r[0] if r else "", r[1] if len(r) > 1 else "") for r in body]


def _parse_layers(text: str, n: int | None) -> list[int] | None:
    try:
        from lrp_ray.sweep.indices import parse_index_list

        idx = parse_index_list(text, "layers")
    except Exception:  # noqa: BLE001  (an unreadable selection is not the report's problem)
        return None
    if idx is None:
        return list(range(n)) if n else None
    return idx


def check(rows: pd.DataFrame, manifest: Manifest | None, manifest_error: str | None,
          errors: list[tuple[str, str]], missing_images: list[str]) -> Health:
    """All problems of a folder, most important first."""
    h = Health()
    if manifest_error:
        h.add(manifest_error, level="error")
    elif manifest is None:
        h.add("no manifest.json: the command, model digest and timings of this run are unknown")
    else:
        if manifest.status != "complete":
            why = f": {manifest.error}" if manifest.error else ""
            h.add(f"run status is '{manifest.status}', not 'complete'{why}", level="error")
        c = manifest.counts
        if c is not None and c.items_missing:
            h.add(f"{c.items_missing} of {c.items_total} planned work items are not on disk", level="error")
        if manifest.failed_items:
            h.add(f"{len(manifest.failed_items)} work items failed",
                  [f"{k}: {v}" for k, v in sorted(manifest.failed_items.items())][:200], level="error")
        dims = manifest.model.dims or {}
        present = set(zip(rows["module"].astype(str), rows["layer"].astype(int), strict=True)) \
            if len(rows) else set()
        for module, text in (manifest.selection.layers or {}).items():
            want = _parse_layers(text, dims.get(module))
            lacking = [lay for lay in (want or []) if (module, lay) not in present]
            if lacking:
                h.add(f"{module} layers {', '.join(map(str, lacking))} were requested but have no rows",
                      level="error")
        if manifest.duplicate_images:
            h.add(f"{len(manifest.duplicate_images)} groups of identical image files",
                  [" = ".join(g) for g in manifest.duplicate_images][:200])
    if errors:
        h.add(f"{len(errors)} images failed and are not in the results (see the run page)",
              [f"{a}: {b}" for a, b in errors[:200]])
    if len(rows):
        keys = ["module", "layer", "feature", "image", "query"]
        dup = rows.duplicated(keys, keep="first")
        h.duplicates = int(dup.sum())
        if h.duplicates:
            d = rows.loc[dup, keys].head(50)
            h.add(f"{h.duplicates} duplicate rows (same module, layer, feature, image and query): the first "
                  "of each is used", [f"{r.module} layer {r.layer} feature {r.feature}: {r.image}"
                                      + ("" if pd.isna(r.query) else f" query {r.query}")
                                      for r in d.itertuples(index=False)], level="error")
        planned = (manifest.result_spec or {}).get("images") if manifest is not None else None
        failed = {e[0] for e in errors}
        n_images = (len([i for i in planned if str(i[0]) not in failed]) if isinstance(planned, list)
                    else rows["image"].nunique())  # the run's usable images, known from its start
        per = rows.drop_duplicates(["module", "layer", "feature", "image"]).groupby(
            ["module", "layer", "feature"], observed=True).size()
        short = per[per < n_images]
        if len(short):
            h.incomplete_features = {(str(m), int(lay), int(f)) for m, lay, f in short.index}
            by_layer = short.groupby(level=[0, 1], observed=True).size()
            h.add(f"{len(short)} features have fewer than the run's {n_images} images",
                  [f"{m} layer {lay}: {k} features incomplete" for (m, lay), k in by_layer.items()],
                  level="error")
    if missing_images:
        h.add(f"{len(missing_images)} image files not found: their pictures are drawn on a gray canvas",
              missing_images[:200])
    return h
