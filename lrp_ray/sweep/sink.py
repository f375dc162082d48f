"""ResultSink: the only writer of OUT during a sweep.

Parts are committed exactly once (a work item's rows go to its own part file, written under a temp name
and renamed; a second result for the same item is counted and dropped), errors.csv lists the images that
could not be used, and manifest.json (typed, see :mod:`lrp_ray.results`) says what was asked and how the
run went.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import OutputError
from .plan import WorkItem
from .writer import OWNED_NAMES, clean_temp_files, clear_outputs, write_part

__all__ = ["ResultSink", "read_manifest", "versions", "OWNED_NAMES"]


def read_manifest(out: Path) -> Any:
    """OUT's manifest (None when there is none or it cannot be read): the results module's one reader."""
    from lrp_ray.results import read_manifest as read

    return read(out)


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
    """Parts of ``OUT/relevance`` (hive-partitioned by module and layer), errors.csv and manifest.json."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dataset = out / "relevance"
        self.committed: set[str] = set()
        self.rows = 0
        self.duplicates = 0
        self.seconds = 0.0

    def open(self, overwrite: bool, errors: list, redo: Iterable[WorkItem] = ()) -> None:
        """Make OUT ready: clear it (``overwrite``), drop temp files left behind and the parts of ``redo``
        (short or unreadable ones, about to be computed again), write errors.csv."""
        from .summary import write_errors

        try:
            if overwrite:
                clear_outputs(self.out)
            for it in redo:
                (self.dataset / it.part_relpath).unlink(missing_ok=True)
            self.dataset.mkdir(parents=True, exist_ok=True)
            clean_temp_files(self.dataset)
            write_errors(self.out, errors)
        except OSError as exc:
            raise OutputError(exc, f"to {self.out}") from exc

    def commit(self, item: WorkItem, table: Any) -> bool:
        """Write ``item``'s rows once; False (and nothing written) for a repeated result."""
        if item.part_relpath in self.committed:
            self.duplicates += 1
            return False
        t0 = time.perf_counter()
        try:
            write_part(self.dataset, item.part_relpath, table)
        except OSError as exc:  # disk full, read-only, a file where a folder must go: stop cleanly
            raise OutputError(exc, f"{self.dataset / item.part_relpath}") from exc
        self.seconds += time.perf_counter() - t0
        self.committed.add(item.part_relpath)
        self.rows += table.num_rows
        return True

    def missing(self, items: list[WorkItem]) -> list[str]:
        """Planned parts that are not on disk with their rows (what 'complete' is checked against)."""
        import pyarrow.parquet as pq

        bad = []
        for it in items:
            try:
                if pq.read_metadata(self.dataset / it.part_relpath).num_rows != it.n_maps:
                    bad.append(it.part_relpath)
            except (OSError, ValueError):
                bad.append(it.part_relpath)
        return bad

    def write_manifest(self, data: dict) -> Any:
        """Validate ``data`` as a :class:`lrp_ray.results.Manifest` and write it atomically."""
        from lrp_ray.results import Manifest, write_manifest

        manifest = Manifest.model_validate(data)
        try:
            write_manifest(self.out, manifest)
        except OSError as exc:
            raise OutputError(exc, f"{self.out / 'manifest.json'}") from exc
        return manifest
