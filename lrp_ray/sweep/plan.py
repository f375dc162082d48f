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

__all__ = ["Batch", "WorkItem", "Plan", "make_plan", "pixel_items", "KINDS", "FEATURE_DATASET",
           "PIXEL_DATASET"]

FEATURE_DATASET = "relevance"
PIXEL_DATASET = "pixels"
KINDS = ("features", "detections", "pixels")
PIXEL_ITEM_FEATURES = 32
"""Features per pixel work item (each pick costs a backbone backward; items stay short)."""


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
    picks: tuple[tuple[str, int, int], ...] = ()
    """Pixel items: the (image, feature, query or -1) targets to compute."""

    @property
    def key(self) -> str:
        return f"b{self.batch:05d}" if self.kind == "detections" else f"b{self.batch:05d}-c{self.chunk:04d}"

    @property
    def uid(self) -> str:
        """Unique across the sweep (module and layer are the part file's folders)."""
        if self.kind == "features":
            return f"{self.module}-l{self.layer}-{self.key}"
        if self.kind == "pixels":
            return f"pixels-{self.module}-l{self.layer}-{self.key}"
        return f"{self.kind}-{self.key}"

    @property
    def n_maps(self) -> int:
        """Rows (relevance maps) a feature item writes; 0 for a detection item (its row count depends on
        what the model detects, and its last part records it)."""
        if self.kind == "pixels":
            return len(self.picks)
        if self.kind != "features":
            return 0
        return self.n_images * len(self.features) * self.targets_per_feature

    def expected_rows(self, lost: set[str]) -> int:
        """Rows of a single-part item when the images ``lost`` (of its batch) changed during the run."""
        if self.kind == "pixels":
            return sum(1 for p in self.picks if p[0] not in lost)
        return self.n_maps // max(1, self.n_images) * (self.n_images - len(lost))

    @property
    def parts(self) -> dict[str, str]:
        """Dataset -> part path inside it, in commit order."""
        tag = f"-{self.tag}" if self.tag else ""
        if self.kind == "features":
            return {FEATURE_DATASET: f"module={self.module}/layer={self.layer}/part-{self.key}{tag}.parquet"}
        if self.kind == "pixels":
            return {PIXEL_DATASET: f"part-{self.module}-l{self.layer}-{self.key}{tag}.parquet"}
        return {name: f"part-{self.key}{tag}.parquet" for name in self.datasets}

    @property
    def part_relpath(self) -> str:
        """The item's identity on disk: its last part, relative to OUT."""
        name, rel = list(self.parts.items())[-1]
        return rel if self.kind == "features" else f"{name}/{rel}"

    @property
    def single_part(self) -> bool:
        """Its one part's row count is known from the plan (else the last part records the counts)."""
        return self.kind in ("features", "pixels")

    def label(self, n_batches: int) -> str:
        """The seed's log style: ``encoder layer 5, features 0-63, batch 3/33 (4 images)``."""
        s = "s" if self.n_images != 1 else ""
        what = {"features": f"{self.module} layer {self.layer}, features {format_indices(self.features)}",
                "pixels": f"pixel maps of {self.module} layer {self.layer} ({len(self.picks)} targets)",
                }.get(self.kind, self.kind)
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


def pixel_items(picks: list[tuple[str, int, str, int, int]], batches: list[Batch], tag: str = "",
                features_per_item: int = PIXEL_ITEM_FEATURES) -> list[WorkItem]:
    """Pixel work items for ``picks`` ((module, layer, image, feature, query or -1), e.g. each feature's
    reference rows): per image batch and (module, layer), the picks of up to ``features_per_item``
    features, in a deterministic order."""
    where = {name: b for b in batches for name in b.images}
    groups: dict[tuple[int, str, int], dict[int, list[tuple[str, int, int]]]] = {}
    for module, layer, image, feature, query in picks:
        b = where[image]
        groups.setdefault((b.index, module, int(layer)), {}).setdefault(int(feature), []).append(
            (image, int(feature), int(query)))
    order = {"encoder": 0, "decoder": 1}
    items = []
    for (bi, module, layer), by_feature in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(
            kv[0][1], 2), kv[0][1], kv[0][2])):
        feats = sorted(by_feature)
        for ci, s in enumerate(range(0, len(feats), features_per_item)):
            chunk = feats[s:s + features_per_item]
            sel = tuple(sorted(p for f in chunk for p in by_feature[f]))
            items.append(WorkItem(bi, module, layer, ci, tuple(chunk), len(batches[bi].images), 0, tag,
                                  kind="pixels", datasets=(PIXEL_DATASET,), picks=sel))
    return items
