"""Notebook API and the calc_lrp drop-in, on real image files through the full model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lrp_ray import calc_lrp
from lrp_ray.api import engine_for, explain, load_model
from lrp_ray.models import DetrConfig, build_model
from lrp_ray.models.preprocess import resize_shape
from lrp_ray.results import FRAME_COLUMNS


@pytest.fixture(scope="module")
def small_model():
    cfg = DetrConfig().with_overrides({
        "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STEM_OUT_CHANNELS": 8, "MODEL.RESNETS.RES2_OUT_CHANNELS": 8,
        "MODEL.DETR.HIDDEN_DIM": 32, "MODEL.DETR.NHEADS": 4, "MODEL.DETR.DIM_FEEDFORWARD": 64,
        "MODEL.DETR.ENC_LAYERS": 2, "MODEL.DETR.DEC_LAYERS": 2, "MODEL.DETR.NUM_OBJECT_QUERIES": 5,
        "MODEL.DETR.NUM_CLASSES": 3, "INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 160,
    })
    import torch

    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (90, 120), "b.png": (120, 70), "sub/c.png": (64, 64)}.items():
        p = d / name
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


def test_explain_rows_and_batch_independence(small_model, image_dir):
    df = explain(small_model, image_dir, "encoder", 1, [0, 5, 31], batch_size=3, device="cpu")
    assert len(df) == 3 * 3
    assert not df.duplicated(["image", "feature"]).any()
    assert [e["image"].endswith("broken.jpg") for e in df.attrs["errors"]] == [True]
    assert df.attrs["profile_names"] == ["encoder.1.in", "encoder.0.in"]
    assert list(df.columns) == list(FRAME_COLUMNS)  # the columns of a sweep's rows (lrp_ray.results.load)
    for _, row in df.iterrows():
        assert len(row.token_map) == row.grid_h * row.grid_w
        assert len(row.channel_relevance) == 32
        h, w = Image.open(row.image).size[::-1]
        assert (row.image_h, row.image_w) == (h, w)
        assert (row.input_h, row.input_w) == resize_shape(h, w, 96, 160)
        assert row.stride == 32 and (row.grid_h, row.grid_w) == (-(-row.input_h // 32), -(-row.input_w // 32))
    # each image alone equals the image inside a padded batch of different sizes
    alone = pd.concat([explain(small_model, [p], "encoder", 1, [0, 5, 31], batch_size=1, device="cpu")
                       for p in sorted(df.image.unique())], ignore_index=True)
    merged = df.merge(alone, on=["image", "feature"], suffixes=("", "_alone"))
    assert len(merged) == len(df)
    for _, r in merged.iterrows():
        a, b = np.asarray(r.token_map_alone), np.asarray(r.token_map)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-12)


def test_decoder_topk_queries_follow_detections(small_model, image_dir):
    eng = engine_for(small_model, device="cpu")
    df = explain(small_model, image_dir, "decoder", 1, [3], queries="top2", engine=eng)
    assert len(df) == 3 * 2
    assert df["query"].notna().all()
    from lrp_ray.models import preprocess, read_image

    img = sorted(df.image.unique())[0]
    cache = eng.forward(preprocess([read_image(img)], small_model.cfg))
    det = eng.detections(cache)[0]
    assert set(df[df.image == img]["query"]) == set(det["query"][:2].tolist())


def test_calc_lrp_main_writes_csv(tmp_path, image_dir, small_model):
    import torch

    weights = tmp_path / "model_final.pth"
    torch.save({"model": {"detr." + k: v for k, v in small_model.state_dict().items()}}, weights)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(small_model.cfg.to_yaml())
    out = tmp_path / "res" / "out.csv"
    df = calc_lrp.main(images_dir=str(image_dir), layer_index=1, feature_index=7, which_module="encoder",
                       output_csv=str(out), weights_path=str(weights), batch_size=2, config_path=str(cfg),
                       device="cpu", use_model_cache=True)
    csv = pd.read_csv(out)
    assert len(csv) == len(df) == 3
    assert (csv.feature == 7).all() and (csv.layer == 1).all()
    tm = json.loads(csv.token_map[0])
    assert len(tm) == csv.grid_h[0] * csv.grid_w[0]
    # same numbers as the API on the same weights
    ref = explain(load_model(cfg, weights), image_dir, "encoder", 1, [7], device="cpu")
    np.testing.assert_allclose(np.sort(csv.act_sum.values), np.sort(ref.act_sum.values), rtol=1e-6)
    with pytest.raises(ValueError, match="which_module"):
        calc_lrp.main(str(image_dir), 1, 7, "middle", str(out), str(weights), config_path=str(cfg))


def test_explain_takes_a_single_image_file_and_explains_a_repeated_feature_once(small_model, image_dir):
    one = explain(small_model, image_dir / "a.jpg", "encoder", 1, [3, 3, 1], device="cpu")
    assert list(one["feature"]) == [3, 1] and set(one["image"]) == {str(image_dir / "a.jpg")}
    both = explain(small_model, [image_dir / "a.jpg"], "encoder", 1, [3, 1], device="cpu")
    for col in ("relevance_total", "input_relevance"):
        assert np.array_equal(one[col].to_numpy(), both[col].to_numpy())
    with pytest.raises(FileNotFoundError, match="image folder or file not found"):
        explain(small_model, image_dir / "missing.jpg", "encoder", 1, 0, device="cpu")
