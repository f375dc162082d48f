"""explain_detections: the notebook API over detection targets, on the tiny DETR with real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_ray.api import (
    CONCEPT_COLUMNS,
    DETECTION_COLUMNS,
    HEATMAP_COLUMNS,
    engine_for,
    explain_detections,
)
from lrp_ray.lrp.concepts import conditional_maps, detection_relevance, top_channels
from lrp_ray.lrp.detections import select_detections
from lrp_ray.models import build_model, load_config, preprocess
from tests.conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None, TINY_OVERRIDES))


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(64, 96), (96, 64), (70, 70)]]


def _explain(model, images, **kw):
    base = dict(device="cpu", precision="fp64", epsilon=0.0, batch_size=2)
    return explain_detections(model, images, **{**base, **kw})


def test_frames_columns_and_consistency_with_the_engine(model, arrays):
    layers = {"encoder": [1], "decoder": [0, 1]}
    ex = _explain(model, arrays, detections="top2", layers=layers, top_concepts=3)
    assert tuple(ex.detections.columns) == DETECTION_COLUMNS
    assert tuple(ex.concepts.columns) == CONCEPT_COLUMNS
    assert tuple(ex.heatmaps.columns) == HEATMAP_COLUMNS
    assert len(ex.detections) == 6 and ex.no_detections == [] and ex.errors == []
    assert len(ex.concepts) == 6 * 3 * 32 and len(ex.heatmaps) == 6 * 3 * 3
    assert ex.detections["query"].dtype == np.int32 and ex.concepts["relevance"].dtype == np.float64
    for df in (ex.detections, ex.heatmaps):
        assert all(len(t) == h * w and t.dtype == np.float32
                   for t, h, w in zip(df["token_map"], df["grid_h"], df["grid_w"], strict=True))
    # boxes, scores, logits and maps are the engine's
    eng = engine_for(model, "cp", 0.0, "cpu", "fp64")
    batch = preprocess(arrays[:2], model.cfg)
    cache = eng.forward(batch)
    ref = eng.detections(cache)
    dets = select_detections(cache, "top2")
    rel = detection_relevance(eng, cache, dets, layers)
    first = ex.detections[ex.detections["image"] == "array_0"]
    np.testing.assert_array_equal(first["query"], ref[0]["query"][:2])
    np.testing.assert_allclose(first[["x0", "y0", "x1", "y1"]].to_numpy(), ref[0]["boxes"][:2], rtol=1e-6)
    np.testing.assert_allclose(first["score"], ref[0]["scores"][:2], rtol=1e-6)
    np.testing.assert_allclose(first["logit"], rel.logit[0], rtol=1e-12)
    total = first[["input_relevance", "bias_relevance", "pos_relevance", "softmax_relevance"]].sum(axis=1)
    np.testing.assert_allclose(total, first["logit"], rtol=1e-9)
    h, w = rel.valid_hw[0]
    np.testing.assert_allclose(first["token_map"].iloc[1], rel.token_maps[0, 1, :h, :w].ravel(), rtol=1e-6)
    # concepts: share of the logit; heatmaps: the top channels by concept relevance, conditioned maps
    c = ex.concepts
    sel = c[(c["image"] == "array_0") & (c["query"] == dets.query[0, 0]) & (c["module"] == "decoder")
            & (c["layer"] == 0)].sort_values("feature")
    np.testing.assert_allclose(sel["relevance"], rel.concepts[("decoder", 0)][0, 0], rtol=1e-12)
    np.testing.assert_allclose(sel["other_relevance"], rel.others[("decoder", 0)][0, 0], rtol=1e-12)
    np.testing.assert_allclose(sel["share"], sel["relevance"] / rel.logit[0, 0], rtol=1e-12)
    assert c.loc[c["module"] == "encoder", "other_relevance"].isna().all()
    hm = ex.heatmaps
    hsel = hm[(hm["image"] == "array_0") & (hm["query"] == dets.query[0, 0]) & (hm["module"] == "decoder")
              & (hm["layer"] == 0)].sort_values("rank")
    chans = top_channels(rel, "decoder", 0, 3)
    assert list(hsel["feature"]) == list(chans[0, 0])
    assert list(hsel["feature"]) == list(sel.sort_values("relevance", ascending=False)["feature"][:3])
    cond = conditional_maps(eng, cache, rel, "decoder", 0, chans)
    np.testing.assert_allclose(np.stack(hsel["token_map"]), cond.token_maps[0, 0, :, :h, :w].reshape(3, -1),
                               rtol=1e-6)


def test_heatmaps_of_every_channel_add_up_to_the_detection_map(model, arrays):
    ex = _explain(model, arrays[:2], detections="top1", module="encoder", layers=[0], top_concepts=32)
    assert set(ex.heatmaps["feature"]) == set(range(32))
    for _, det in ex.detections.iterrows():
        rows = ex.heatmaps[(ex.heatmaps["image"] == det["image"]) & (ex.heatmaps["query"] == det["query"])]
        summed = np.stack(rows["token_map"]).astype(np.float64).sum(0)
        np.testing.assert_allclose(summed, det["token_map"], rtol=1e-5, atol=1e-6 * np.abs(summed).max())


def test_images_without_detections_are_listed(model, arrays, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.fromarray(arrays[0]).save(tmp_path / "ok.png")
    ex = _explain(model, [tmp_path / "ok.png", tmp_path / "broken.png", arrays[1]], detections="score>=1.0")
    assert len(ex.no_detections) == 2 and ex.no_detections[0].endswith("ok.png")
    assert ex.no_detections[1] == "array_2"
    assert [e["image"].endswith("broken.png") for e in ex.errors] == [True]
    assert ex.detections.empty and ex.concepts.empty and ex.heatmaps.empty
    assert tuple(ex.detections.columns) == DETECTION_COLUMNS


@pytest.mark.parametrize("kw,msg", [
    (dict(detections="top9"), "1..5"), (dict(detections="class=3"), "valid ids are 0..2"),
    (dict(detections=[(5, 0)]), "valid queries are 0..4"), (dict(detections="most"), "'topK'"),
    (dict(module="middle"), "module must be"), (dict(module="decoder", layers=[2]), "valid layers are 0..1"),
    (dict(top_concepts=-1), "top_concepts"),
])
def test_bad_requests_raise_before_any_work(model, kw, msg, monkeypatch):
    from lrp_ray.lrp import LrpEngine

    monkeypatch.setattr(LrpEngine, "forward", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(ValueError, match=msg):
        _explain(model, [np.zeros((64, 64, 3), np.uint8)], **kw)


def test_class_filter_in_default_fp32(model, arrays):
    """The defaults (fp32, epsilon 1e-6): a class filter explains every query predicted as that class."""
    eng = engine_for(model, device="cpu")
    cache = eng.forward(preprocess(arrays, model.cfg))
    labels = cache.pred_logits[..., :-1].argmax(-1).numpy()
    cls = int(np.bincount(labels.ravel()).argmax())
    ex = explain_detections(model, arrays, detections=f"class={cls}", module="decoder", layers=1,
                            top_concepts=2, device="cpu")
    assert len(ex.detections) == int((labels == cls).sum()) and set(ex.detections["class_id"]) == {cls}
    assert set(ex.concepts["module"]) == {"decoder"} and set(ex.concepts["layer"]) == {1}
    assert len(ex.heatmaps) == 2 * len(ex.detections)
    assert ex.no_detections == [f"array_{i}" for i in range(3) if not (labels[i] == cls).any()]
    assert ex.precision == "fp32" and ex.epsilon == 1e-6


def test_concepts_by_class_ranks_features_by_mean_share_over_the_class_detections(model, arrays):
    ex = _explain(model, arrays, detections="top3", layers={"encoder": [1], "decoder": [0]}, top_concepts=2)
    by = ex.concepts_by_class()
    c = ex.concepts
    assert len(by) == len(c.groupby(["class_id", "module", "layer", "feature"]))
    for (cls, module, layer), g in by.groupby(["class_id", "module", "layer"], sort=False):
        rows = c[(c.class_id == cls) & (c.module == module) & (c.layer == layer)]
        n = len(rows.groupby(["image", "query"]))
        assert (g.detections == n).all()
        best = g.iloc[0]
        want = rows.groupby("feature").share.mean()
        assert best.feature == want.idxmax() and np.isclose(best.share_mean, want.max())
        # every detection has exactly 2 top channels at this layer: the rates add up to 2
        assert np.isclose(g.top_k_rate.sum(), 2.0)
    shares = by.groupby("class_id").share_mean.apply(lambda s: s.is_monotonic_decreasing)
    assert shares.all()
