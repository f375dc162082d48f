"""The sample images bundled with the package (lrp_ray/assets/demo/images)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lrp_ray.demo import demo_config_path, demo_images_dir, demo_weights_path
from lrp_ray.demo.samples import SAMPLES, sample_scenes
from lrp_ray.demo.scenes import CAR, CLASS_NAMES
from lrp_ray.models import read_image


def _truth():
    return json.loads((demo_images_dir() / "boxes.json").read_text())


def test_samples_present_varied_and_match_the_generator():
    truth = _truth()
    assert truth["class_names"] == list(CLASS_NAMES)
    files = sorted(p.name for p in demo_images_dir().iterdir() if p.suffix in (".png", ".jpg"))
    assert files == sorted(name for name, _ in SAMPLES) and 6 <= len(files) <= 8
    assert {f.rsplit(".", 1)[1] for f in files} == {"png", "jpg"}
    sizes = set()
    for name, scene in sample_scenes():
        img = read_image(demo_images_dir() / name)
        assert img.shape == scene.image.shape
        sizes.add(img.shape[:2])
        if name.endswith(".png"):
            np.testing.assert_array_equal(img, scene.image)  # lossless: exactly the generated scene
        else:
            assert np.abs(img.astype(int) - scene.image.astype(int)).mean() < 12  # JPEG (q 92) of noise
        t = truth["images"][name]
        np.testing.assert_allclose(t["boxes"], scene.boxes, atol=0.05)
        assert t["labels"] == scene.labels.tolist() and CAR in t["labels"]
        assert (t["height"], t["width"]) == img.shape[:2]
    ratios = {round(w / h, 2) for h, w in sizes}
    assert len(sizes) == len(files) and min(ratios) < 0.8 and max(ratios) > 1.5


@pytest.mark.skipif(not (demo_weights_path().is_file() and demo_config_path().is_file()),
                    reason="demo model not bundled yet")
def test_demo_model_finds_the_cars_in_the_samples():
    from lrp_ray.demo.evaluate import box_iou, predict
    from lrp_ray.models import load_model

    model = load_model()  # no arguments: the bundled demo
    truth = _truth()["images"]
    names = sorted(truth)
    dets = predict(model, model.cfg, [read_image(demo_images_dir() / n) for n in names])
    found = total = 0
    for name, d in zip(names, dets, strict=True):
        cars = np.asarray(truth[name]["boxes"])[np.asarray(truth[name]["labels"]) == CAR]
        pred = d.boxes[(d.labels == CAR) & (d.scores >= 0.5)]
        total += len(cars)
        if len(pred):
            found += int((box_iou(cars, pred).max(1) >= 0.5).sum())
    assert found >= 0.8 * total, (found, total)
