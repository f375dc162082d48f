"""Notebook API: load a model, explain features of a layer on images, get a DataFrame.

Frames have the columns and dtypes of :func:`lrp_ray.results.load` (a sweep's rows), so notebook frames
and sweep outputs can be concatenated and compared directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .lrp import EngineConfig, LrpEngine, RelevanceResult
from .models import ImageReadError, load_model, preprocess, read_image
from .results import backbone_stride, empty_frame, image_text
from .sweep.images import IMAGE_EXTENSIONS

__all__ = ["load_model", "explain", "explain_arrays", "engine_for", "IMAGE_EXTENSIONS", "list_images"]


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


def explain_arrays(engine: LrpEngine, cfg: Any, images: Sequence[np.ndarray], ids: Sequence[str],
                   module: str, layer: int, features: int | str | Iterable[int],
                   queries: Any = None, batch_size: int = 4) -> pd.DataFrame:
    """Relevance rows for RGB uint8 arrays: one forward per batch, all features from its cache.

    Rows carry the geometry of each image: original size, resized input size, token grid and stride."""
    feats = _features(features, engine.weights.hidden_dim)
    engine.validate(module, layer, feats)
    frames = []
    for i in range(0, len(images), batch_size):
        batch = preprocess(list(images[i:i + batch_size]), cfg)
        cache = engine.forward(batch)
        res: RelevanceResult = engine.relevance(cache, module, layer, feats, queries)
        frames.append(res.to_frame(list(ids[i:i + batch_size]), batch.image_sizes,
                                   stride=backbone_stride(cfg), input_sizes=batch.input_sizes))
    df = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    if frames:
        df.attrs["profile_names"] = engine.profile_names(module, layer)
    return df


def explain(model: Any, images: str | Path | Sequence[str | Path | np.ndarray], module: str, layer: int,
            features: int | str | Iterable[int], queries: Any = None, rules: str = "cp",
            epsilon: float = 1e-6, batch_size: int = 4, device: str = "auto", precision: str = "fp32",
            engine: LrpEngine | None = None) -> pd.DataFrame:
    """LRP relevance of ``features`` at ``module`` layer ``layer``: one row per image x target.

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
    cfg = getattr(engine.parts.module, "cfg", None) or getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError("the model carries no preprocessing config (.cfg); load it with load_model()")
    df = explain_arrays(engine, cfg, arrays, ids, module, layer, features, queries, batch_size)
    df.attrs["errors"] = errors
    return df
