"""Faithfulness of detection explanations: deletion curves follow the explained query; pointing game."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrp_ray.api import engine_for, explain_detections, list_images, load_model
from lrp_ray.faithfulness import FAITHFULNESS_COLUMNS, detection_faithfulness
from lrp_ray.models import build_model, load_config, preprocess
from lrp_ray.sweep.images import DEMO_IMAGES
from tests.conftest import TINY_OVERRIDES


def test_curves_are_recomputed_exactly_from_the_same_query(tmp_path):
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY_OVERRIDES))
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((64, 96), (80, 70))]
    eng = engine_for(model, device="cpu", precision="fp64", epsilon=0.0)
    ex = explain_detections(model, arrays, detections="top2", layers={"encoder": [1]}, top_concepts=1,
                            engine=eng)
    f = detection_faithfulness(eng, model.cfg, dict(zip(["array_0", "array_1"], arrays, strict=True)),
                               ex.detections, steps=4, n_random=3)
    assert tuple(f.columns) == FAITHFULNESS_COLUMNS and len(f) == len(ex.detections) == 4
    for d, r in zip(ex.detections.itertuples(), f.itertuples(), strict=True):
        rel, rnd = np.asarray(r.curve_relevance), np.asarray(r.curve_random)
        assert rel[0] == rnd[0] == 1.0
        assert np.isclose(rel[-1], rnd[-1])  # every token deleted: the same input whatever the order
        # the first deletion step by hand: zero the k most relevant tokens, read the same query's logit
        img = arrays[int(d.image.split("_")[1])]
        src, pos, mask = eng.encoder_inputs(preprocess([img], model.cfg))
        tmap = np.asarray(d.token_map).reshape(d.grid_h, d.grid_w)
        k = int(round(r.fractions[1] * tmap.size))
        rows, cols = np.unravel_index(np.argsort(-tmap.ravel(), kind="stable")[:k], tmap.shape)
        masked = src.clone()
        masked[0, :, torch.as_tensor(rows), torch.as_tensor(cols)] = 0.0
        y0 = float(eng.forward_tokens(src, pos, mask).pred_logits[0, d.query, d.class_id])
        y1 = float(eng.forward_tokens(masked, pos, mask).pred_logits[0, d.query, d.class_id])
        assert rel[1] == pytest.approx(1.0 + (y1 - y0) / abs(y0), rel=1e-9, abs=1e-9)


def test_demo_car_detections_are_explained_faithfully():
    model = load_model()  # the bundled demo: class 0 is "car"
    eng = engine_for(model, device="cpu")
    files = list_images(DEMO_IMAGES)
    ex = explain_detections(model, files, detections="score>=0.5", layers={"encoder": [2]}, top_concepts=1,
                            engine=eng)
    cars = ex.detections[ex.detections.class_id == 0]
    assert len(cars) >= 8
    f = detection_faithfulness(eng, model.cfg, {str(p): p for p in files}, cars)
    assert f.pointing_hit.mean() >= 0.8  # the most relevant token lies on the car's own box
    assert f.auc_relevance.mean() < f.auc_random.mean() - 0.2  # relevance-first deletion hurts faster
