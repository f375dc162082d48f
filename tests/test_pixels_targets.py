"""Pixel maps of the engine's targets (features, detections) and the API's ``pixels=True``: end to end on
the demo model and on a wrapped model, against zennit applied directly to the backbone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lrp_ray.api import PIXEL_COLUMNS, engine_for, explain, explain_detections, load_model
from lrp_ray.demo import demo_config_path, demo_images_dir, demo_weights_path
from lrp_ray.models import preprocess, read_image
from lrp_ray.pixels import (
    detection_pixel_maps,
    feature_pixel_maps,
    reduced_shape,
    resolve_composite,
    to_image_grid,
)
from lrp_ray.pixels.backbone import PixelNet, find_body
from lrp_ray.pixels.canonizers import backbone_canonizers
from lrp_ray.pixels.composites import pixel_box


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_config_path(), demo_weights_path())


@pytest.fixture(scope="module")
def images():
    paths = sorted(demo_images_dir().glob("scene_0[12].*"))
    arrays = []
    for p in paths:  # small crops of two demo scenes: different sizes and aspect ratios
        a = read_image(p)
        arrays.append(a[: a.shape[0] // 2, : a.shape[1] * 2 // 3])
    return arrays


@pytest.fixture(scope="module")
def fp64(demo, images):
    engine = engine_for(demo, precision="fp64", device="cpu")
    batch = preprocess(images, demo.cfg)
    return engine, batch, engine.forward(batch)


def _direct(model: nn.Module, engine, cache, batch, rel: torch.Tensor, composite: str,
            max_side) -> np.ndarray:
    """zennit applied directly to the model's backbone + input_proj, one backward per target, then the
    same resampling to the image grid: [B, N, H', W'] zero-padded."""
    net = copy.deepcopy(PixelNet(find_body(model), model.input_proj)).double().eval()
    low, high = pixel_box(model.cfg, torch.float64)
    gh, gw = cache.meta["grid"]
    d = rel.shape[-1]
    shapes = [reduced_shape(*s, max_side) for s in batch.image_sizes]
    out = np.zeros((rel.shape[0], rel.shape[1], max(h for h, _ in shapes), max(w for _, w in shapes)))
    for b in range(rel.shape[0]):
        vh, vw = cache.meta["valid_hw"][b]
        h, w = batch.input_sizes[b]
        x = batch.tensor[b:b + 1, :, :h, :w].double()
        for n in range(rel.shape[1]):
            up = rel[b, n].reshape(gh, gw, d)[:vh, :vw].permute(2, 0, 1)[None].double()
            xi = x.clone().requires_grad_(True)
            comp = resolve_composite(composite).build(backbone_canonizers(), low, high)
            with comp.context(net) as m:
                (g,) = torch.autograd.grad(m(xi), xi, up)
            grid = to_image_grid(g[0].sum(0).numpy(), batch.image_sizes[b], max_side)
            out[b, n, :grid.shape[0], :grid.shape[1]] = grid
    return out


@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_feature_maps_equal_zennit_direct_on_the_demo_model(demo, fp64, composite):
    engine, batch, cache = fp64
    pm = feature_pixel_maps(engine, cache, batch, "encoder", 2, [3, 17, 40], composite=composite, max_side=64)
    rel, _ = engine.token_relevance(cache, "encoder", 2, [3, 17, 40])
    ref = _direct(demo, engine, cache, batch, rel, composite, 64)
    assert pm.maps.shape == ref.shape
    assert float(np.abs(pm.maps - ref).max() / np.abs(ref).max()) < 1e-6
    assert pm.composite == composite and pm.identity["pixel_name"] == composite


def test_token_totals_and_map_sums(fp64):
    engine, batch, cache = fp64
    res = engine.relevance(cache, "decoder", 1, [5, 9], queries="top2")
    pm = feature_pixel_maps(engine, cache, batch, "decoder", 1, [5, 9], queries="top2", max_side=50)
    np.testing.assert_allclose(pm.token_relevance, res.input_relevance, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(pm.queries, res.queries)
    np.testing.assert_array_equal(pm.features, res.features)
    for b, size in enumerate(batch.image_sizes):
        assert tuple(pm.shape_hw[b]) == reduced_shape(*size, 50)
        h, w = pm.shape_hw[b]
        assert np.all(pm.maps[b, :, h:, :] == 0) and np.all(pm.maps[b, :, :, w:] == 0)
    np.testing.assert_allclose(pm.maps.sum((-1, -2)), pm.pixel_relevance, rtol=1e-5)


def test_k_targets_equal_single_targets_through_the_entry_point(fp64):
    engine, batch, cache = fp64
    many = feature_pixel_maps(engine, cache, batch, "encoder", 1, [2, 7, 11, 30])
    one = [feature_pixel_maps(engine, cache, batch, "encoder", 1, [f]) for f in (2, 7, 11, 30)]
    single = np.concatenate([p.maps for p in one], axis=1)
    assert float(np.abs(many.maps - single).max() / np.abs(single).max()) < 1e-8
    chunked = feature_pixel_maps(engine, cache, batch, "encoder", 1, [2, 7, 11, 30], chunk=3)
    assert float(np.abs(chunked.maps - single).max() / np.abs(single).max()) < 1e-8


class Wrapper(nn.Module):
    """A foreign model holding our DETR one level down (like a detectron2 meta-architecture)."""

    def __init__(self, detr: nn.Module) -> None:
        super().__init__()
        self.detr = detr
        self.extra = nn.Linear(2, 2)


def test_a_wrapped_model_gives_the_same_maps_and_matches_zennit(demo, images, fp64):
    engine, batch, cache = fp64
    wrapped = engine_for(Wrapper(demo), precision="fp64", device="cpu")
    c2 = wrapped.forward(batch)
    a = feature_pixel_maps(engine, cache, batch, "encoder", 0, [1, 4], max_side=40)
    b = feature_pixel_maps(wrapped, c2, batch, "encoder", 0, [1, 4], max_side=40)
    np.testing.assert_allclose(b.maps, a.maps, rtol=1e-9, atol=1e-12)
    rel, _ = wrapped.token_relevance(c2, "encoder", 0, [1, 4])
    ref = _direct(demo, wrapped, c2, batch, rel, "EpsilonPlusFlat", 40)
    assert float(np.abs(b.maps - ref).max() / np.abs(ref).max()) < 1e-6


def test_detection_maps(fp64):
    engine, batch, cache = fp64
    dets = engine.select_detections(cache, "top2")
    pm = detection_pixel_maps(engine, cache, batch, dets, max_side=64)
    rel = engine.detection_relevance(cache, dets)
    valid = dets.valid
    np.testing.assert_allclose(pm.token_relevance[valid], rel.input_relevance[valid], rtol=1e-9)
    assert np.all(pm.maps[~valid] == 0)
    assert np.all(np.abs(pm.maps[valid]).sum((-1, -2)) > 0)


def test_a_backbone_that_does_not_match_the_cache_is_refused(demo, images, fp64):
    engine, batch, cache = fp64
    other = engine_for(load_model(demo_config_path(), None), precision="fp64", device="cpu")
    with pytest.raises(ValueError, match="does not reproduce"):
        feature_pixel_maps(other, cache, batch, "encoder", 0, [0])


# ------------------------------------------------------------------------------------------------ API
def test_explain_pixels_adds_maps_on_the_image_grid(demo, images):
    df = explain(demo, images, module="encoder", layer=2, features=[0, 5], device="cpu", pixels=True,
                 pixel_max_side=64)
    plain = explain(demo, images, module="encoder", layer=2, features=[0, 5], device="cpu")
    assert set(PIXEL_COLUMNS) <= set(df.columns) and not set(PIXEL_COLUMNS) & set(plain.columns)
    assert list(df.columns[:len(plain.columns)]) == list(plain.columns)
    for _, row in df.iterrows():
        assert (row.pixel_h, row.pixel_w) == reduced_shape(row.image_h, row.image_w, 64)
        m = np.asarray(row.pixel_map, dtype=np.float64)
        assert m.size == row.pixel_h * row.pixel_w
        assert m.sum() == pytest.approx(row.pixel_relevance, rel=1e-4, abs=1e-6)
        assert row.pixel_composite == "EpsilonPlusFlat"
    np.testing.assert_allclose(np.asarray(df["input_relevance"]), np.asarray(plain["input_relevance"]))


def test_explain_pixels_bad_composite_is_one_line(demo, images):
    with pytest.raises(ValueError, match="unknown composite 'Flat'"):
        explain(demo, images, module="encoder", layer=0, features=[0], device="cpu", pixels=True,
                composite="Flat")


def test_explain_detections_pixels(demo, images):
    out = explain_detections(demo, images, detections="top2", module="encoder", layers=[2], top_concepts=0,
                             device="cpu", pixels=True, pixel_max_side=48, composite="EpsilonAlpha2Beta1Flat")
    det = out.detections
    assert len(det) > 0 and set(PIXEL_COLUMNS) <= set(det.columns)
    for _, row in det.iterrows():
        assert (row.pixel_h, row.pixel_w) == reduced_shape(row.image_h, row.image_w, 48)
        assert len(row.pixel_map) == row.pixel_h * row.pixel_w
        assert row.pixel_composite == "EpsilonAlpha2Beta1Flat"


def test_conditional_pixel_maps_of_all_channels_add_up_to_the_detections_pixel_map(demo, images):
    """LRP is linear in its start and the backbone rules are linear in the upstream relevance: at an
    encoder layer the pixel maps conditioned on each of the d channels sum to the detection's pixel map."""
    d = int(engine_for(demo, device="cpu").weights.hidden_dim)
    out = explain_detections(demo, images[:2], detections="top1", module="encoder", layers=[2],
                             top_concepts=d, device="cpu", pixels=True, pixel_max_side=48)
    maps = out.heatmaps
    assert len(maps) == len(out.detections) * d and set(PIXEL_COLUMNS) <= set(maps.columns)
    for det in out.detections.itertuples():
        rows = maps[(maps.image == det.image) & (maps["query"] == det.query)]
        assert sorted(rows.feature) == list(range(d))
        total = np.sum(np.stack([np.asarray(m, np.float64) for m in rows.pixel_map]), axis=0)
        want = np.asarray(det.pixel_map, np.float64)
        np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        assert not np.allclose(np.asarray(rows.pixel_map.iloc[0], np.float64), want)  # one channel is not all
