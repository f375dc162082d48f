"""The sweep plan: image batches and work items.

Two kinds of work item (:data:`KINDS`): ``features`` — (image batch, module, layer, feature chunk), rows
in ``relevance/module=<m>/layer=<l>/part-<key>-<request digest>.parquet`` — and ``detections`` — one per
image batch: its detections propagated once, with concepts at every requested layer and their conditional
maps, rows in ``<dataset>/part-<key>-<digest>.parquet`` of each detection dataset. A work item is
idempotent: computing it twice gives the same rows in the same files. Keys hold no image name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import DEFAULT_ITEM_FEATURES, format_indices

__all__ = ["Batch", "WorkItem", "Plan", "make_plan", "KINDS", "FEATURE_DATASET"]

FEATURE_DATASET = "relevance"
KINDS = ("features", "detections")


@dataclass(frozen=True)
class Batch:
    index: int
    images: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"b{self.index:05d}"


@dataclass(frozen=True)
class WorkItem:
    batch: int
    module: str
    layer: int
    chunk: int
    features: tuple[int, ...]
    n_images: int
    targets_per_feature: int
    tag: str = ""
    """The request's digest: part files carry it, so parts of another request are never counted."""
    kind: str = "features"
    datasets: tuple[str, ...] = (FEATURE_DATASET,)
    """Datasets the item writes a part to, in commit order (the last one proves the item complete)."""

    @property
    def key(self) -> str:
        return f"b{self.batch:05d}-c{self.chunk:04d}" if self.kind == "features" else f"b{self.batch:05d}"

    @property
    def uid(self) -> str:
        """Unique across the sweep (module and layer are the part file's folders)."""
        if self.kind == "features":
            return f"{self.module}-l{self.layer}-{self.key}"
        return f"{self.kind}-{self.key}"

    @property
    def n_maps(self) -> int:
        """Rows (relevance maps) a feature item writes; 0 for a detection item (its row count depends on
        what the model detects, and its last part records it)."""
        if self.kind != "features":
            return 0
        return self.n_images * len(self.features) * self.targets_per_feature

    @property
    def parts(self) -> dict[str, str]:
        """Dataset -> part path inside it, in commit order."""
        tag = f"-{self.tag}" if self.tag else ""
        if self.kind == "features":
            return {FEATURE_DATASET: f"module={self.module}/layer={self.layer}/part-{self.key}{tag}.parquet"}
        return {name: f"part-{self.key}{tag}.parquet" for name in self.datasets}

    @property
    def part_relpath(self) -> str:
        """The item's identity on disk: its last part, relative to OUT."""
        name, rel = list(self.parts.items())[-1]
        return rel if self.kind == "features" else f"{name}/{rel}"

    def label(self, n_batches: int) -> str:
        """The seed's log style: ``encoder layer 5, features 0-63, batch 3/33 (4 images)``."""
        s = "s" if self.n_images != 1 else ""
        what = (f"{self.module} layer {self.layer}, features {format_indices(self.features)}"
                if self.kind == "features" else "detections")
        return f"{what}, batch {self.batch + 1}/{n_batches} ({self.n_images} image{s})"


@dataclass
class Plan:
    batches: list[Batch]
    items: list[WorkItem]
    layers: dict[str, list[int]]
    features: list[int]
    item_features: int
    by_batch: dict[int, list[WorkItem]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_batch = {}
        for it in self.items:
            self.by_batch.setdefault(it.batch, []).append(it)

    @property
    def total_maps(self) -> int:
        return sum(it.n_maps for it in self.items)


def make_plan(images: list[str], batch_size: int, layers: dict[str, list[int]], features: list[int],
              feature_chunk: int | str, targets_per_feature: dict[str, int], tag: str = "",
              detection_datasets: tuple[str, ...] = ()) -> Plan:
    """Batches of ``batch_size`` images in name order; per batch, every (module, layer, feature chunk),
    then (with ``detection_datasets``) one detections item.

    ``targets_per_feature``: rows per image and feature (1 for the encoder; selected queries for the decoder).
    """
    size = DEFAULT_ITEM_FEATURES if feature_chunk == "auto" else int(feature_chunk)
    batches = [Batch(i, tuple(images[s:s + batch_size]))
               for i, s in enumerate(range(0, len(images), batch_size))]
    chunks = [tuple(features[s:s + size]) for s in range(0, len(features), size)]
    items = []
    for b in batches:
        for module, module_layers in layers.items():
            for layer in module_layers:
                for ci, feats in enumerate(chunks):
                    items.append(WorkItem(b.index, module, layer, ci, feats, len(b.images),
                                          targets_per_feature[module], tag))
        if detection_datasets:
            items.append(WorkItem(b.index, "", -1, 0, (), len(b.images), 0, tag, kind="detections",
                                  datasets=tuple(detection_datasets)))
    return Plan(batches, items, layers, features, size)
