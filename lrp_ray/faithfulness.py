"""Faithfulness of detection explanations, following the explained query (never re-matching boxes).

- Deletion: the encoder input tokens of the detection's image are zeroed in order of the detection's
  relevance, and (as the baseline) in random orders; after each step the same query's logit for the same
  class is read off a new forward. A faithful map makes the logit fall faster than random deletion: a
  smaller area under the curve. Curves are ``1 + (logit - logit_0) / |logit_0|`` (1 at the start).
- Pointing game: does the input patch of the map's most relevant token overlap the detection's own box?
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .lrp import LrpEngine
from .models import preprocess, read_image
from .models.preprocess import resize_shape
from .results import backbone_stride, image_path

__all__ = ["detection_faithfulness", "FAITHFULNESS_COLUMNS"]

FAITHFULNESS_COLUMNS = ("image", "query", "class_id", "pointing_hit", "auc_relevance", "auc_random",
                        "fractions", "curve_relevance", "curve_random")
"""One row per detection; ``fractions`` and the two curves are lists of the same length."""


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Area under a curve (trapezoids)."""
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


def _cell_hits(token_map: np.ndarray, box: Sequence[float], image_hw: tuple[int, int],
               input_hw: tuple[int, int], stride: int) -> bool:
    i, j = np.unravel_index(int(np.argmax(token_map)), token_map.shape)
    sy, sx = image_hw[0] / input_hw[0], image_hw[1] / input_hw[1]
    x0, y0 = j * stride * sx, i * stride * sy
    x1, y1 = min((j + 1) * stride * sx, image_hw[1]), min((i + 1) * stride * sy, image_hw[0])
    bx0, by0, bx1, by1 = (float(v) for v in box)
    return bool(x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1)


@torch.no_grad()
def _deletion(engine: LrpEngine, image: np.ndarray, cfg: Any, token_map: np.ndarray, query: int,
              class_id: int, steps: int, n_random: int,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src, pos, mask = engine.encoder_inputs(preprocess([image], cfg))
    gh, gw = token_map.shape
    n_tok = gh * gw
    ks = sorted({int(round(x)) for x in np.linspace(0, n_tok, steps + 1)})
    rng = np.random.default_rng(seed)
    orders = [np.argsort(-token_map.ravel(), kind="stable")]
    orders += [rng.permutation(n_tok) for _ in range(n_random)]
    keep = torch.ones(len(orders) * len(ks), 1, *src.shape[-2:], dtype=src.dtype, device=src.device)
    for o, order in enumerate(orders):
        for s, k in enumerate(ks):
            rows, cols = np.unravel_index(order[:k], (gh, gw))
            keep[o * len(ks) + s, 0, torch.as_tensor(rows), torch.as_tensor(cols)] = 0.0
    m = keep.shape[0]
    cache = engine.forward_tokens(src.expand(m, -1, -1, -1) * keep, pos.expand(m, -1, -1, -1),
                                  mask.expand(m, -1, -1))
    y = cache.pred_logits[:, query, class_id].double().cpu().numpy().reshape(len(orders), len(ks))
    curves = 1.0 + (y - y[:, :1]) / np.maximum(np.abs(y[:, :1]), 1e-12)
    return np.asarray(ks, dtype=np.float64) / n_tok, curves[0], curves[1:].mean(0)


def detection_faithfulness(engine: LrpEngine, cfg: Any, images: dict[str, np.ndarray | str | Path],
                           detections: pd.DataFrame, steps: int = 10, n_random: int = 5,
                           seed: int = 0) -> pd.DataFrame:
    """Deletion curves and pointing game for every row of ``detections`` (the frame
    :func:`lrp_ray.api.explain_detections` returns). ``images`` maps each detection's ``image`` id to its
    RGB array or file (stored names are resolved with :func:`lrp_ray.results.image_path` against ``""``).
    The random orders of a detection are seeded by ``seed`` and the detection's identity (image, query,
    class), so its figures do not depend on which other detections are in the frame."""
    stride = backbone_stride(cfg)
    rows = []
    for d in detections.itertuples(index=False):
        src = images[d.image]
        arr = src if isinstance(src, np.ndarray) else read_image(image_path("", str(src)))
        tmap = np.asarray(d.token_map, dtype=np.float64).reshape(int(d.grid_h), int(d.grid_w))
        image_hw = (int(d.image_h), int(d.image_w))
        input_hw = resize_shape(*image_hw, int(cfg.min_size_test), int(cfg.max_size_test))
        fr, rel, rnd = _deletion(engine, arr, cfg, tmap, int(d.query), int(d.class_id), steps, n_random,
                                 seed + zlib.crc32(f"{d.image}|{int(d.query)}|{int(d.class_id)}".encode()))
        hit = _cell_hits(tmap, (d.x0, d.y0, d.x1, d.y1), image_hw, input_hw, stride)
        rows.append({"image": d.image, "query": int(d.query), "class_id": int(d.class_id),
                     "pointing_hit": hit, "auc_relevance": _area(rel, fr), "auc_random": _area(rnd, fr),
                     "fractions": fr.tolist(), "curve_relevance": rel.tolist(),
                     "curve_random": rnd.tolist()})
    return pd.DataFrame(rows, columns=list(FAITHFULNESS_COLUMNS))
