"""The sweep plan: image batches and work items keyed by (image batch, module, layer, feature chunk).

A work item is idempotent: computing it twice gives the same rows, written to the same part file
``relevance/module=<m>/layer=<l>/part-<key>-<request digest>.parquet``. The key holds no image name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import DEFAULT_ITEM_FEATURES, format_indices

__all__ = ["Batch", "WorkItem", "Plan", "make_plan"]


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

    @property
    def key(self) -> str:
        return f"b{self.batch:05d}-c{self.chunk:04d}"

    @property
    def uid(self) -> str:
        """Unique across the sweep (module and layer are the part file's folders)."""
        return f"{self.module}-l{self.layer}-{self.key}"

    @property
    def n_maps(self) -> int:
        return self.n_images * len(self.features) * self.targets_per_feature

    @property
    def part_relpath(self) -> str:
        tag = f"-{self.tag}" if self.tag else ""
        return f"module={self.module}/layer={self.layer}/part-{self.key}{tag}.parquet"

    def label(self, n_batches: int) -> str:
        """The seed's log style: ``encoder layer 5, features 0-63, batch 3/33 (4 images)``."""
        s = "s" if self.n_images != 1 else ""
        return (f"{self.module} layer {self.layer}, features {format_indices(self.features)}, "
                f"batch {self.batch + 1}/{n_batches} ({self.n_images} image{s})")


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
              feature_chunk: int | str, targets_per_feature: dict[str, int], tag: str = "") -> Plan:
    """Batches of ``batch_size`` images in name order; per batch, every (module, layer, feature chunk).

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
    return Plan(batches, items, layers, features, size)
