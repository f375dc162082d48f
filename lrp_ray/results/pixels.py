"""Rows of pixel maps (:mod:`lrp_ray.pixels`): one per image x target, in ``OUT/pixels/`` as Parquet.

A pixel map is on its original image's grid reduced to ``max_side`` by block sums (``pixel_h`` x
``pixel_w``, row-major ``pixel_map``; its sum is ``pixel_relevance``; ``token_relevance`` is what entered
the backbone). ``composite`` names the zennit composite (its full identity belongs in the manifest).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["PIXELS_DIR", "PIXEL_SCHEMA", "pixel_table", "pixel_files", "read_pixel_maps"]

PIXELS_DIR = "pixels"

PIXEL_SCHEMA = pa.schema([
    pa.field("module", pa.string()), pa.field("layer", pa.int32()), pa.field("image", pa.string()),
    pa.field("feature", pa.int32()), pa.field("query", pa.int32()), pa.field("composite", pa.string()),
    pa.field("max_side", pa.int32()), pa.field("pixel_h", pa.int32()), pa.field("pixel_w", pa.int32()),
    pa.field("pixel_relevance", pa.float64()), pa.field("token_relevance", pa.float64()),
    pa.field("pixel_map", pa.list_(pa.float32())),
])

MapKey = tuple[str, int, int, str, int | None]
"""(module, layer, feature, image, query or None)."""


def pixel_table(pm: Any, module: str, layer: int, image_names: Sequence[str]) -> pa.Table:
    """Rows (image-major, then target) of a :class:`lrp_ray.pixels.PixelMaps` of feature targets."""
    b, n = pm.maps.shape[:2]
    if len(image_names) != b:
        raise ValueError(f"{len(image_names)} image names for {b} images")
    slots = [(i, k) for i in range(b) for k in range(n)]
    queries = pm.queries if pm.queries is not None else np.full((b, n), -1)
    features = pm.features if pm.features is not None else np.full(n, -1)
    q = [int(queries[i, k]) for i, k in slots]
    return pa.Table.from_pydict({
        "module": [module] * len(slots), "layer": [int(layer)] * len(slots),
        "image": [str(image_names[i]) for i, _ in slots], "feature": [int(features[k]) for _, k in slots],
        "query": [v if v >= 0 else None for v in q], "composite": [pm.composite] * len(slots),
        "max_side": [None if pm.max_side is None else int(pm.max_side)] * len(slots),
        "pixel_h": [int(pm.shape_hw[i, 0]) for i, _ in slots],
        "pixel_w": [int(pm.shape_hw[i, 1]) for i, _ in slots],
        "pixel_relevance": [float(pm.pixel_relevance[i, k]) for i, k in slots],
        "token_relevance": [float(pm.token_relevance[i, k]) for i, k in slots],
        "pixel_map": [pm.pixel_map(i, k).astype(np.float32).ravel() for i, k in slots],
    }, schema=PIXEL_SCHEMA)


def pixel_files(out: str | Path) -> list[Path]:
    """The part files of ``OUT/pixels`` of the request in the manifest (by its digest, as for every
    dataset of a sweep; sorted; empty when there are none)."""
    from .detections import detection_dataset_files

    return detection_dataset_files(out, PIXELS_DIR)


def read_pixel_maps(out: str | Path, keys: Iterable[MapKey] | None = None) -> dict[MapKey, np.ndarray]:
    """Pixel maps ``[pixel_h, pixel_w]`` of a results folder by (module, layer, feature, image, query);
    only ``keys`` when given."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    files = pixel_files(out)
    if not files:
        return {}
    want = None if keys is None else set(keys)
    data = ds.dataset([str(f) for f in files], schema=PIXEL_SCHEMA, format="parquet")
    flt = None
    if want is not None:
        if not want:
            return {}
        flt = pc.field("image").isin(sorted({k[3] for k in want})) & pc.field("feature").isin(
            sorted({k[2] for k in want}))
    t = data.to_table(filter=flt).to_pydict()
    out_maps: dict[MapKey, np.ndarray] = {}
    for i in range(len(t["image"])):
        key = (t["module"][i], int(t["layer"][i]), int(t["feature"][i]), t["image"][i], t["query"][i])
        if want is None or key in want:
            out_maps[key] = np.asarray(t["pixel_map"][i], dtype=np.float32).reshape(t["pixel_h"][i],
                                                                                     t["pixel_w"][i])
    return out_maps
