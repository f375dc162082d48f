"""Detection-target outputs, read only through ``lrp_ray.results``' detection functions, and guarded:
a folder without them (or a build of lrp_ray without the module) reads as None."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Detections", "read_detection_outputs", "class_label"]


def _api() -> Any | None:
    try:
        from lrp_ray.results import detections
    except ImportError:
        return None
    return detections


def class_label(class_id: Any, class_name: Any) -> str:
    """A class as shown: its name, else ``class <id>``."""
    if isinstance(class_name, str) and class_name:
        return class_name
    return f"class {int(class_id)}"


@dataclass
class Detections:
    """What a run with detection targets wrote (each None when absent), plus read errors."""

    out: Path
    detections: pd.DataFrame | None = None
    concepts: pd.DataFrame | None = None
    by_class: pd.DataFrame | None = None
    faithfulness: pd.DataFrame | None = None
    has_maps: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def present(self) -> bool:
        return any(x is not None for x in (self.detections, self.concepts, self.by_class, self.faithfulness))

    def concept_maps(self, columns: Sequence[str], filters: Any = None) -> pd.DataFrame | None:
        """Rows of the conditional maps (``load_concept_maps``)."""
        api = _api()
        if api is None:
            return None
        return api.load_concept_maps(self.out, columns=list(columns), filters=filters)

    def detection_maps(self, filters: Any = None) -> pd.DataFrame | None:
        api = _api()
        cols = ["image", "query", "class_id", "token_map"]
        return None if api is None else api.load_detections(self.out, columns=cols, filters=filters)


def _call(errors: list[str], what: str, fn: Any, *args: Any, **kw: Any) -> pd.DataFrame | None:
    try:
        df = fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001  (a broken dataset is a banner line, not a traceback)
        errors.append(f"{what} unreadable: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return None
    return df if df is None or isinstance(df, pd.DataFrame) else None


def read_detection_outputs(out: Path) -> Detections:
    """The scalar parts of the detection outputs (token maps are read later, per task)."""
    d = Detections(out=out)
    api = _api()
    if api is None:
        return d
    det_cols = ["image", "query", "class_id", "class_name", "score", "x0", "y0", "x1", "y1", "image_h",
                "image_w", "input_h", "input_w", "stride", "grid_h", "grid_w", "logit"]
    d.detections = _call(d.errors, "detections", api.load_detections, out, columns=det_cols)
    d.concepts = _call(d.errors, "concepts", api.load_concepts, out,
                       columns=["image", "query", "class_id", "class_name", "module", "layer", "feature",
                                "relevance", "share"])
    d.by_class = _call(d.errors, "concepts_by_class.csv", api.read_concepts_by_class, out)
    d.faithfulness = _call(d.errors, "faithfulness", api.read_faithfulness, out)
    keys = _call(d.errors, "concept_maps", api.load_concept_maps, out, columns=["image"])
    d.has_maps = keys is not None and len(keys) > 0
    return d
