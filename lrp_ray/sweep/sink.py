"""ResultSink: the only writer of OUT during a sweep.

Parts are committed exactly once (a work item's rows go to its own part file, written under a temp name
and renamed; a second result for the same item is counted and dropped), errors.csv lists the images that
could not be used, and manifest.json (typed, see :mod:`lrp_ray.results`) says what was asked and how the
run went.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lrp_ray.results.detections import NO_DETECTIONS_KEY

from .errors import OutputError
from .plan import WorkItem
from .writer import (
    OWNED_NAMES,
    ROWS_KEY,
    clean_temp_files,
    clear_outputs,
    dataset_names,
    schema_of,
    write_part,
)

__all__ = ["ResultSink", "read_manifest", "versions", "OWNED_NAMES"]


def read_manifest(out: Path) -> Any:
    """OUT's manifest (None when there is none or it cannot be read): the results module's one reader."""
    from lrp_ray.results import read_manifest as read

    return read(out)


LOST_KEY = b"lrp_ray.images_lost"
"""Part metadata: images of the batch that changed or vanished during the run (their rows are absent)."""


def without_images(tables: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """``tables`` without the rows of images ``names``, each table's metadata naming them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lost = json.dumps(sorted(names)).encode()
    out = {}
    for key, t in tables.items():
        keep = pc.invert(pc.is_in(t.column("image"), value_set=pa.array(sorted(names), pa.string())))
        meta = dict(t.schema.metadata or {})
        if NO_DETECTIONS_KEY in meta:
            meta[NO_DETECTIONS_KEY] = json.dumps([n for n in json.loads(meta[NO_DETECTIONS_KEY])
                                                  if n not in names]).encode()
        meta[LOST_KEY] = lost
        out[key] = t.filter(keep).replace_schema_metadata(meta)
    return out


def versions() -> dict[str, str]:
    """Versions of what computed the results (for the manifest)."""
    import numpy
    import pandas
    import pyarrow
    import ray
    import torch

    import lrp_ray

    return {"lrp_ray": lrp_ray.__version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "pandas": pandas.__version__}


class ResultSink:
    """Parts of ``OUT/relevance`` (hive-partitioned by module and layer) and of the detection datasets,
    errors.csv and manifest.json."""

    def __init__(self, out: Path, usable: Iterable[str] = ()) -> None:
        self.out = out
        self.dataset = out / "relevance"
        self.committed: set[str] = set()
        self.rows = 0
        self.duplicates = 0
        self.seconds = 0.0
        self.errors: list = []
        self.usable = set(usable)
        """The request's usable images: a part written without one of them (it had changed during an
        earlier run) is not done."""
        self.lost: dict[int, set[str]] = {}
        """Per batch: images that changed or vanished during this run (their rows are dropped)."""

    @property
    def lost_names(self) -> set[str]:
        return set().union(*self.lost.values()) if self.lost else set()

    def open(self, overwrite: bool, errors: list, redo: Iterable[WorkItem] = ()) -> None:
        """Make OUT ready: clear it (``overwrite``), drop temp files left behind and the parts of ``redo``
        (short or unreadable ones, about to be computed again), write errors.csv."""
        from .summary import write_errors

        self.errors = errors
        try:
            if overwrite:
                clear_outputs(self.out)
            for it in redo:
                for name, rel in it.parts.items():
                    (self.out / name / rel).unlink(missing_ok=True)
            self.dataset.mkdir(parents=True, exist_ok=True)
            for name in dataset_names(self.out):
                clean_temp_files(self.out / name)
            write_errors(self.out, errors)
        except OSError as exc:
            raise OutputError(exc, f"to {self.out}") from exc

    def drop_parts(self, items: Iterable[WorkItem]) -> None:
        """Remove the (short or unreadable) parts of ``items``, about to be computed again."""
        try:
            for it in items:
                for name, rel in it.parts.items():
                    (self.out / name / rel).unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(exc, f"to {self.out}") from exc

    def commit(self, item: WorkItem, tables: dict[str, Any]) -> bool:
        """Write ``item``'s rows once (one table per dataset of the item, in the item's order: its last
        part, written last, records the row counts of the others); False (and nothing written) for a
        repeated result."""
        if item.part_relpath in self.committed:
            self.duplicates += 1
            return False
        t0 = time.perf_counter()
        self._write(item, tables)
        self.seconds += time.perf_counter() - t0
        self.committed.add(item.part_relpath)
        self.rows += sum(t.num_rows for t in tables.values())
        return True

    def _write(self, item: WorkItem, tables: dict[str, Any]) -> None:
        parts = item.parts
        if set(tables) != set(parts):
            raise ValueError(f"{item.uid}: tables for {sorted(tables)}, expected {sorted(parts)}")
        counts = {name: int(tables[name].num_rows) for name in parts}
        last = list(parts)[-1]
        for name, rel in parts.items():
            table = tables[name]
            if name == last and len(parts) > 1:
                meta = dict(table.schema.metadata or {})
                meta[ROWS_KEY] = json.dumps(counts).encode()
                table = table.replace_schema_metadata(meta)
            try:
                write_part(self.out / name, rel, table, schema_of(name))
            except OSError as exc:  # disk full, read-only, a file where a folder must go: stop cleanly
                raise OutputError(exc, f"{self.out / name / rel}") from exc

    def drop_lost_rows(self, items: Iterable[WorkItem]) -> int:
        """Rewrite parts written before this run that still hold rows of images lost during it (a
        resumed batch): afterwards no part holds a row of an image in errors.csv. Returns the parts
        rewritten."""
        import pyarrow.parquet as pq

        n = 0
        for it in items:
            names = self.lost.get(it.batch)
            if not names or it.part_relpath in self.committed or not self._on_disk(it):
                continue
            try:
                tables = {name: pq.read_table(self.out / name / rel) for name, rel in it.parts.items()}
            except (OSError, ValueError):
                continue  # not on disk whole: 'missing' reports it
            if not any(t.num_rows and set(t.column("image").to_pylist()) & names for t in tables.values()):
                continue
            self._write(it, without_images(tables, names))
            n += 1
        return n

    def missing(self, items: list[WorkItem]) -> list[str]:
        """Planned items whose parts are not all on disk with their rows (what 'complete' is checked
        against): a feature part must hold its maps; a detection item's last part records the row
        counts of its others."""
        usable = self.usable - self.lost_names
        bad = []
        for it in items:
            if not self._on_disk(it, usable=usable):
                bad.append(it.part_relpath)
        return bad

    def _on_disk(self, it: WorkItem, usable: set[str] | None = None) -> bool:
        """All of ``it``'s parts whole with their rows, none written without a ``usable`` image."""
        import pyarrow.parquet as pq

        parts = it.parts
        try:
            last = list(parts)[-1]
            meta = pq.read_metadata(self.out / last / parts[last])
            lost = set(json.loads((meta.metadata or {}).get(LOST_KEY, b"[]")))
            if usable is not None and lost & usable:  # the image is back: compute the part with it
                return False
            if it.single_part:
                return meta.num_rows == it.expected_rows(lost)
            counts = json.loads((meta.metadata or {}).get(ROWS_KEY, b"{}"))
            if set(counts) != set(parts) or counts[last] != meta.num_rows:
                return False
            return all(pq.read_metadata(self.out / n / r).num_rows == counts[n]
                       for n, r in parts.items() if n != last)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def add_lost(self, batch: int, errors: list) -> None:
        """Images of ``batch`` that changed or vanished during the run: their rows are dropped, and each is
        added once to the run's errors and to errors.csv at once."""
        from .summary import write_errors

        self.lost.setdefault(batch, set()).update(e.name for e in errors)
        known = {e.name for e in self.errors}
        new = [e for e in errors if e.name not in known]
        if not new:
            return
        self.errors.extend(new)
        try:
            write_errors(self.out, self.errors)
        except OSError as exc:
            raise OutputError(exc, f"{self.out / 'errors.csv'}") from exc

    def write_manifest(self, data: dict) -> Any:
        """Validate ``data`` as a :class:`lrp_ray.results.Manifest` and write it atomically."""
        from lrp_ray.results import Manifest, write_manifest

        manifest = Manifest.model_validate(data)
        try:
            write_manifest(self.out, manifest)
        except OSError as exc:
            raise OutputError(exc, f"{self.out / 'manifest.json'}") from exc
        return manifest
