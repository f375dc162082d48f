"""Notebook API: load a model, explain features of a layer on images, get a DataFrame.

Frames have the columns and dtypes of :func:`lrp_ray.results.load` (a sweep's rows), so notebook frames
and sweep outputs can be concatenated and compared directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .lrp import EngineConfig, LrpEngine, RelevanceResult
from .lrp.concepts import explain_batch
from .lrp.detections import DetectionSelection, parse_selection, resolve_class_name
from .models import ImageReadError, load_model, preprocess, read_image
from .results import backbone_stride, empty_frame, image_text
from .results.detections import (
    CONCEPT_MAP_SCHEMA,
    CONCEPT_SCHEMA,
    DETECTION_SCHEMA,
    concepts_by_class,
    detection_tables,
    tables_to_frames,
)
from .sweep.images import IMAGE_EXTENSIONS

__all__ = ["load_model", "explain", "explain_arrays", "engine_for", "IMAGE_EXTENSIONS", "list_images",
           "explain_detections", "DetectionExplanation", "DETECTION_COLUMNS", "CONCEPT_COLUMNS",
           "HEATMAP_COLUMNS", "PIXEL_COLUMNS"]


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; a single image file is a list of one."""
    root = Path(folder).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"image folder or file not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def engine_for(model: Any, rules: str = "cp", epsilon: float = 1e-6, device: str = "auto",
               precision: str = "fp32", compile: bool = False) -> LrpEngine:
    """An LRP engine over ``model`` (ours or any DETR-structured module)."""
    return LrpEngine(model, EngineConfig(rules=rules, epsilon=epsilon, precision=precision, device=device,
                                         compile=compile))


def _features(features: int | str | Iterable[int], hidden_dim: int) -> list[int]:
    if isinstance(features, str):
        if features != "all":
            raise ValueError(f"features must be ints or 'all', got {features!r}")
        return list(range(hidden_dim))
    if isinstance(features, (int, np.integer)):
        return [int(features)]
    return list(dict.fromkeys(int(f) for f in features))  # each feature once, in the order given


PIXEL_COLUMNS = ("pixel_map", "pixel_h", "pixel_w", "pixel_relevance", "pixel_composite")
"""Columns ``pixels=True`` adds: the pixel map (row-major float32 list on the original image's grid
reduced to ``pixel_max_side`` by block sums), its shape, its sum and the zennit composite's name."""


def _pixel_columns(pm: Any, slots: Sequence[tuple[int, int]]) -> dict[str, list]:
    """Pixel columns for the (image, target) ``slots`` of a :class:`lrp_ray.pixels.PixelMaps`."""
    return {
        "pixel_map": [pm.pixel_map(b, n).astype(np.float32).ravel().tolist() for b, n in slots],
        "pixel_h": [int(pm.shape_hw[b, 0]) for b, _ in slots],
        "pixel_w": [int(pm.shape_hw[b, 1]) for b, _ in slots],
        "pixel_relevance": [float(pm.pixel_relevance[b, n]) for b, n in slots],
        "pixel_composite": [pm.composite for _ in slots],
    }


def explain_arrays(engine: LrpEngine, cfg: Any, images: Sequence[np.ndarray], ids: Sequence[str],
                   module: str, layer: int, features: int | str | Iterable[int],
                   queries: Any = None, batch_size: int = 4, pixels: bool = False,
                   composite: str = "EpsilonPlusFlat", pixel_max_side: int | None = 256) -> pd.DataFrame:
    """Relevance rows for RGB uint8 arrays: one forward per batch, all features from its cache.

    Rows carry the geometry of each image: original size, resized input size, token grid and stride.
    ``pixels``: also the pixel map of every row (:data:`PIXEL_COLUMNS`; one backbone backward per image
    for all its targets)."""
    feats = _features(features, engine.weights.hidden_dim)
    engine.validate(module, layer, feats)
    if pixels:
        from .pixels import resolve_composite

        resolve_composite(composite)
    frames = []
    for i in range(0, len(images), batch_size):
        batch = preprocess(list(images[i:i + batch_size]), cfg)
        cache = engine.forward(batch)
        res: RelevanceResult = engine.relevance(cache, module, layer, feats, queries)
        frame = res.to_frame(list(ids[i:i + batch_size]), batch.image_sizes, stride=backbone_stride(cfg),
                             input_sizes=batch.input_sizes)
        if pixels:
            from .pixels import feature_pixel_maps

            pm = feature_pixel_maps(engine, cache, batch, module, layer, feats, queries, composite,
                                    pixel_max_side)
            slots = [(b, n) for b in range(res.n_images) for n in range(res.n_targets)]  # image-major rows
            for k, v in _pixel_columns(pm, slots).items():
                frame[k] = v
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    if frames:
        df.attrs["profile_names"] = engine.profile_names(module, layer)
    return df


def _read_inputs(images: Sequence[str | Path | np.ndarray]) -> tuple[list[np.ndarray], list[str], list[dict]]:
    """RGB arrays, their ids (stored image names; ``array_K`` for arrays) and the unreadable files."""
    arrays, ids, errors = [], [], []
    for k, item in enumerate(images):
        if isinstance(item, np.ndarray):
            arrays.append(item)
            ids.append(f"array_{k}")
            continue
        try:
            arrays.append(read_image(item))
            ids.append(image_text(str(item)))
        except ImageReadError as exc:
            errors.append({"image": image_text(str(item)), "reason": exc.reason})
    return arrays, ids, errors


def _preprocessing(engine: LrpEngine, model: Any) -> Any:
    """The model's preprocessing config (sizes, pixel mean/std)."""
    cfg = getattr(engine.parts.module, "cfg", None) or getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError("the model carries no preprocessing config (.cfg); load it with load_model()")
    return cfg


def explain(model: Any, images: str | Path | Sequence[str | Path | np.ndarray], module: str, layer: int,
            features: int | str | Iterable[int], queries: Any = None, rules: str = "cp",
            epsilon: float = 1e-6, batch_size: int = 4, device: str = "auto", precision: str = "fp32",
            engine: LrpEngine | None = None, pixels: bool = False, composite: str = "EpsilonPlusFlat",
            pixel_max_side: int | None = 256) -> pd.DataFrame:
    """LRP relevance of ``features`` at ``module`` layer ``layer``: one row per image x target.

    ``pixels=True`` continues each row's relevance through the input projection and the ResNet backbone
    to the image (zennit ``composite``: EpsilonPlusFlat, EpsilonGammaBox or EpsilonAlpha2Beta1Flat) and
    adds :data:`PIXEL_COLUMNS`: ``pixel_map`` on the original image's grid reduced to at most
    ``pixel_max_side`` pixels per side by summing blocks (its sum is the total pixel relevance), shape in
    ``pixel_h``/``pixel_w``. It costs a backbone backward per image (all of its targets at once).

    ``images`` is a folder, an image file, or a list of paths and/or RGB uint8 arrays; a feature given
    twice is explained once. Unreadable images are skipped
    and listed in ``df.attrs["errors"]`` (image, reason). ``queries`` (decoder): ``"all"``, ``"topK"``
    or explicit ids. The profile column's names are in ``df.attrs["profile_names"]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, (str, Path)):
        images = list_images(images)
    engine = engine or engine_for(model, rules, epsilon, device, precision)
    arrays, ids, errors = _read_inputs(images)
    cfg = _preprocessing(engine, model)
    df = explain_arrays(engine, cfg, arrays, ids, module, layer, features, queries, batch_size, pixels,
                        composite, pixel_max_side)
    df.attrs["errors"] = errors
    return df


# ------------------------------------------------------------------------------------------ detections
DETECTION_COLUMNS = tuple(DETECTION_SCHEMA.names)
"""Columns of :attr:`DetectionExplanation.detections`: one row per explained detection (box xyxy in
original image pixels; ``logit`` the relevance it starts with; ``token_map`` its unconditional map)."""
CONCEPT_COLUMNS = tuple(CONCEPT_SCHEMA.names)
"""Columns of :attr:`DetectionExplanation.concepts`: per detection, layer and channel; encoder: summed
over valid tokens; decoder: on the detection's own query, ``other_*`` over the other queries (encoder
NaN); shares are of the logit."""
HEATMAP_COLUMNS = tuple(CONCEPT_MAP_SCHEMA.names)
"""Columns of :attr:`DetectionExplanation.heatmaps`: the map conditioned on one channel at one layer
(``rank`` 0 = most relevant; ``relevance`` the concept's), row-major over the image's valid grid."""


@dataclass
class DetectionExplanation:
    """What :func:`explain_detections` returns: three frames (the layouts of a sweep's ``detections/``,
    ``concepts/`` and ``concept_maps/`` datasets), and the images without a detection that passed the
    selection (``no_detections``) or that could not be read (``errors``)."""

    detections: pd.DataFrame
    concepts: pd.DataFrame
    heatmaps: pd.DataFrame
    no_detections: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    rules: str = "cp"
    epsilon: float = 1e-6
    precision: str = "fp32"
    top_concepts: int = 5

    def concepts_by_class(self, top_k: int | None = None) -> pd.DataFrame:
        """Per class, over all its explained detections: each (module, layer, feature)'s mean and spread
        of its share of the class logit, its mean relevance, and how often it is among a detection's
        ``top_k`` channels at that layer (default: the run's ``top_concepts``). Sorted by class, then by
        mean share, highest first: a class's first rows answer "which features does the model use for
        it". ``detections`` counts the detections of the class."""
        k = self.top_concepts if top_k is None else int(top_k)
        return concepts_by_class([self.concepts], k)


LayerSelection = int | Iterable[int] | Mapping[str, Iterable[int]] | None


def _detection_layers(engine: LrpEngine, module: str, layers: LayerSelection) -> dict[str, list[int]]:
    """``{module: layers}`` from ``module`` ("both", "encoder", "decoder") and ``layers`` (None: all; ints
    apply to each module; or a mapping per module)."""
    if module not in ("both", "encoder", "decoder"):
        raise ValueError(f"module must be 'both', 'encoder' or 'decoder', got {module!r}")
    modules = ["encoder", "decoder"] if module == "both" else [module]
    n = {"encoder": len(engine.weights.encoder), "decoder": len(engine.weights.decoder)}
    out: dict[str, list[int]] = {}
    for m in modules:
        if layers is None:
            ls: Iterable[int] = range(n[m])
        elif isinstance(layers, Mapping):
            ls = layers.get(m, range(n[m]))
        elif isinstance(layers, (int, np.integer)):
            ls = [int(layers)]
        else:
            ls = layers
        out[m] = sorted({int(x) for x in ls})
        for x in out[m]:
            engine.validate(m, x, [0])
    return out


def explain_detections(model: Any, images: str | Path | Sequence[str | Path | np.ndarray],
                       detections: DetectionSelection = "top5", module: str = "both",
                       layers: LayerSelection = None,
                       top_concepts: int = 5, rules: str = "cp", epsilon: float = 1e-6,
                       precision: str = "fp32", device: str = "auto", batch_size: int = 4,
                       class_names: Sequence[str] | None = None,
                       engine: LrpEngine | None = None, pixels: bool = False,
                       composite: str = "EpsilonPlusFlat",
                       pixel_max_side: int | None = 256) -> DetectionExplanation:
    """Explain detections: relevance from each detection's class logit to the input tokens, the
    relevance of every channel at the requested layers (concepts) and, for the ``top_concepts`` channels
    of each detection and layer, the token map conditioned on that channel (one pass per layer).

    ``detections``: ``'topK'`` per image by score, ``'score>=X'``, ``'class=C'`` (predicted class) or
    explicit ``(query, class_id)`` pairs; with ``class_names`` (index = class id) also ``'class=<name>'``,
    and rows carry ``class_name``; bad selections raise ValueError. ``layers``: None (every layer
    of ``module``), ints (for each module) or ``{"encoder": [...], "decoder": [...]}``. Images with no
    detection passing the selection are listed in ``no_detections``; unreadable ones in ``errors``.
    ``pixels=True`` adds :data:`PIXEL_COLUMNS` to the detection rows and to the conditional heatmaps'
    rows: each map continued through the backbone to the image (as :func:`explain`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(top_concepts) < 0:
        raise ValueError(f"top_concepts must be >= 0, got {top_concepts}")
    engine = engine or engine_for(model, rules, epsilon, device, precision)
    detections = resolve_class_name(detections, class_names)
    parse_selection(detections, int(engine.parts.query_embed.weight.shape[0]),
                    int(engine.parts.class_embed.weight.shape[0]) - 1)
    want = _detection_layers(engine, module, layers)
    if isinstance(images, (str, Path)):
        images = list_images(images)
    arrays, ids, errors = _read_inputs(images)
    cfg = _preprocessing(engine, model)
    if pixels:
        from .pixels import resolve_composite

        resolve_composite(composite)
    tables, empty, pixel_parts, map_parts = [], [], [], []
    for i in range(0, len(arrays), batch_size):
        names = ids[i:i + batch_size]
        batch = preprocess(list(arrays[i:i + batch_size]), cfg)
        cache = engine.forward(batch)
        out = explain_batch(engine, cache, detections, want, int(top_concepts), keep_tokens=pixels)
        tables.append(detection_tables(out, names, batch.image_sizes, cfg, class_names, batch.input_sizes))
        if pixels and out.relevance is not None:
            from .pixels import detection_pixel_maps, pixel_maps_from_tokens

            pm = detection_pixel_maps(engine, cache, batch, out.dets, composite, pixel_max_side)
            pixel_parts.append(_pixel_columns(pm, out.dets.items()))
            for _, cond in sorted(out.conditional.items()):  # the order of the heatmaps rows
                k = cond.channels.shape[-1]
                valid = np.repeat(out.dets.valid, k, axis=1)
                cm = pixel_maps_from_tokens(engine, cache, batch, cond.token_relevance, composite,
                                            pixel_max_side, valid=valid)
                cond.token_relevance = None
                slots = [(b, m * k + j) for b, m in out.dets.items() for j in range(k)]
                map_parts.append(_pixel_columns(cm, slots))
        empty += [names[b] for b in out.dets.no_detections]
    frames = tables_to_frames(tables)
    if pixels:
        for frame, parts in ((frames["detections"], pixel_parts), (frames["concept_maps"], map_parts)):
            for k in PIXEL_COLUMNS:
                frame[k] = [v for part in parts for v in part[k]]
    return DetectionExplanation(
        detections=frames["detections"], concepts=frames["concepts"], heatmaps=frames["concept_maps"],
        no_detections=empty, errors=errors,
        rules=engine.rules.name, epsilon=float(engine.rules.epsilon), precision=engine.config.precision,
        top_concepts=int(top_concepts))
