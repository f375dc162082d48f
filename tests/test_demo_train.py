"""Demo training pieces (matcher, losses, AP, BatchNorm folding, checkpoint) and the shipped demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrp_ray.demo import demo_config_path, demo_dir, demo_weights_path
from lrp_ray.demo.criterion import (
    LossWeights,
    SetCriterion,
    Target,
    hungarian_match,
    pairwise_giou,
)
from lrp_ray.demo.evaluate import ImageDetections, average_precision, evaluate_model
from lrp_ray.demo.train import DEMO_CONFIG, freeze_batchnorm, scene_batches, targets_for, thaw_batchnorm

SHIPPED = demo_weights_path().is_file() and demo_config_path().is_file()
needs_model = pytest.mark.skipif(not SHIPPED, reason="demo model not bundled yet")


def test_giou_identity_and_disjoint():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]])
    g = pairwise_giou(a, b)[0]
    assert g[0] == pytest.approx(1.0)
    assert -1.0 <= float(g[1]) < 0.0


def test_hungarian_match_finds_the_permutation():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])
    logits = torch.zeros(1, 3, 4)
    tgt = Target(labels=torch.tensor([1, 0]),
                 boxes=torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]))
    (qi, ti), = hungarian_match(logits, boxes, [tgt], LossWeights())
    assert dict(zip(qi.tolist(), ti.tolist(), strict=True)) == {0: 1, 1: 0}


def test_criterion_perfect_prediction_is_lowest():
    crit = SetCriterion(3)
    tgt = [Target(labels=torch.tensor([0, 2]),
                  boxes=torch.tensor([[0.3, 0.3, 0.2, 0.1], [0.7, 0.6, 0.2, 0.3]]))]
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :, 3] = 10.0  # no-object everywhere ...
    logits[0, 1] = torch.tensor([10.0, -10, -10, -10])  # ... but query 1 = car, query 3 = triangle
    logits[0, 3] = torch.tensor([-10.0, -10, 10, -10])
    boxes = torch.full((1, 4, 4), 0.5)
    boxes[0, 1] = tgt[0].boxes[0]
    boxes[0, 3] = tgt[0].boxes[1]
    good, parts = crit([logits], [boxes], tgt)
    assert parts["l1"] < 1e-6 and parts["giou"] < 1e-6 and parts["ce"] < 1e-3
    bad, _ = crit([logits], [torch.full((1, 4, 4), 0.5)], tgt)
    assert float(bad) > float(good) + 1.0
    # Aux layers add their own terms.
    two, _ = crit([logits, logits], [boxes, boxes], tgt)
    assert float(two) == pytest.approx(2 * float(good), rel=1e-5, abs=1e-6)


def test_average_precision_known_values():
    gt_b = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([[0, 0, 10, 10]], float)]
    gt_l = [np.array([0, 0]), np.array([1])]
    perfect = [ImageDetections(gt_b[0], np.array([0.9, 0.8]), np.array([0, 0])),
               ImageDetections(gt_b[1], np.array([0.9]), np.array([1]))]
    assert average_precision(perfect, gt_b, gt_l, 0) == pytest.approx(1.0)
    assert average_precision(perfect, gt_b, gt_l, 1) == pytest.approx(1.0)
    # A confident false positive first, then both hits: precision 1/2 at recall 0.5, 2/3 at recall 1.
    fp = [ImageDetections(np.array([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], float),
                          np.array([0.99, 0.9, 0.8]), np.array([0, 0, 0])), ImageDetections(
        np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))]
    assert average_precision(fp, gt_b, gt_l, 0) == pytest.approx(2 / 3)
    # A duplicate of a matched box is a false positive; a miss caps recall.
    half = [ImageDetections(np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float), np.array([0.9, 0.8]),
                            np.array([0, 0])),
            ImageDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))]
    assert average_precision(half, gt_b, gt_l, 0) == pytest.approx(0.5)


def test_batchnorm_thaw_and_freeze_is_exact():
    from lrp_ray.demo import modelio
    from lrp_ray.models import DetrConfig, build_model

    torch.manual_seed(0)
    cfg = DetrConfig().with_overrides(DEMO_CONFIG)
    model = build_model(cfg)
    swapped = thaw_batchnorm(model)
    assert swapped and all(type(m).__name__ == "FrozenBatchNorm2d" for _, m in swapped)
    # Give the BatchNorms non-trivial statistics and affine parameters.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    frozen = freeze_batchnorm(model, swapped)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # live model untouched
    _, scenes = next(scene_batches(2, start=5))
    la, ba = modelio.forward_layers(model, cfg, scenes)
    lb, bb = modelio.forward_layers(frozen, cfg, scenes)
    torch.testing.assert_close(la[-1], lb[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ba[-1], bb[-1], rtol=1e-4, atol=1e-5)
    assert len(targets_for(scenes)) == 2


def test_training_smoke_and_detectron2_checkpoint(tmp_path):
    from lrp_ray.demo.train import main
    from lrp_ray.models import load_model

    rc = main(["--out", str(tmp_path), "--steps", "2", "--eval-every", "2", "--val", "4", "--test", "4",
               "--batch", "2", "--precise-bn", "1"])
    assert rc == 0
    ck = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert set(ck) == {"model"} and all(k.startswith("detr.") for k in ck["model"])
    model = load_model(tmp_path / "config.yaml", tmp_path / "model_final.pth")  # strict: no missing keys
    assert model.cfg.num_classes == 4
    meta = json.loads((tmp_path / "train_metrics.json").read_text())
    assert "AP50_car" in meta["test"] and meta["checkpoint_bytes"] > 0


def test_training_is_deterministic(tmp_path):
    from lrp_ray.demo.train import main

    args = ["--steps", "3", "--eval-every", "3", "--val", "2", "--test", "2", "--batch", "2",
            "--precise-bn", "1"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    a = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@needs_model
def test_shipped_checkpoint_layout_and_size():
    from lrp_ray.models import load_config, load_model

    path = demo_weights_path()
    assert path.stat().st_size <= 5 * 1024 * 1024
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith("detr.") for k in ck["model"])
    cfg = load_config(demo_config_path())
    arch = (cfg.resnet_depth, cfg.hidden_dim, cfg.num_classes, cfg.enc_layers, cfg.dec_layers)
    assert arch == (18, 64, 4, 3, 3)
    load_model(demo_config_path(), path)  # strict load
    load_model()  # the bundled default
    assert (demo_dir() / "TRAINING.md").is_file()


@needs_model
def test_shipped_model_ap50_car_on_heldout():
    """Measured through preprocess -> DETR.forward -> detections, on held-out scenes."""
    from lrp_ray.models import load_model

    model = load_model(demo_config_path(), demo_weights_path())
    res = evaluate_model(model, model.cfg, n=200)
    assert res["AP50_car"] >= 0.8, res
