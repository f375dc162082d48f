"""An image that changes or vanishes after it was checked costs only itself: it is recorded in
errors.csv, and its batch mates get exactly the rows of an undisturbed run (bitwise)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pandas as pd
import pytest

from lrp_ray.results import load
from lrp_ray.results.detections import load_concepts, load_detections
from lrp_ray.sweep import BadRequest, SweepSpec, run_sweep
from lrp_ray.sweep.execution import execute
from lrp_ray.sweep.preparation import prepare

from .conftest import write_images

CHANGED, VANISHED = "b.png", "sub/deeper/d.bmp"   # b.png shares its batch with a.jpg; d.bmp is alone
KEY = ["module", "layer", "image", "feature", "query"]


def spec(images, config, out) -> SweepSpec:
    return SweepSpec(config=str(config), images=str(images), out=str(out), module="both", layers="0",
                     features="0-3", queries="top2", batch_size=2, target="both", detections="top2",
                     top_concepts=2, pixels="top1", pixel_max_side=32, actors=1)


def _rows(df: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    return df.assign(query=df["query"].fillna(-1).astype(int)).sort_values(key).reset_index(drop=True)


def test_changed_and_vanished_images_cost_only_themselves(ray_session, tiny_config, tmp_path):
    ref_images = write_images(tmp_path / "ref_images")
    images = tmp_path / "images"
    shutil.copytree(ref_images, images)
    ref = run_sweep(spec(ref_images, tiny_config, tmp_path / "ref"), log_fn=lambda s: None, progress=False)
    assert ref.exit_code == 0

    prep = prepare(spec(images, tiny_config, tmp_path / "OUT"), log_fn=lambda s: None)
    rng = np.random.default_rng(7)
    from PIL import Image

    original = (images / CHANGED).read_bytes()
    Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(images / CHANGED)  # new content
    vanished = (images / VANISHED).read_bytes()
    (images / VANISHED).unlink()
    res = execute(prep, log_fn=lambda s: None, progress=False)

    assert res.exit_code == 1 and res.manifest["status"] == "complete"   # 1: some images could not be used
    counts = res.manifest["counts"]
    assert counts["images_failed"] == 2 and counts["images_ok"] == 3 and counts["items_missing"] == 0
    with open(tmp_path / "OUT" / "errors.csv", newline="") as fh:
        errors = {r["image"]: r["reason"] for r in csv.DictReader(fh)}
    with open(tmp_path / "OUT" / "errors.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2  # once each, though both phases (tokens, pixels) met them
    assert set(errors) == {CHANGED, VANISHED}
    assert all("since it was checked" in r for r in errors.values())
    assert not set(pd.read_parquet(tmp_path / "OUT" / "pixels")["image"]) & {CHANGED, VANISHED}

    got, want = load(tmp_path / "OUT"), load(tmp_path / "ref")
    assert not set(got["image"]) & {CHANGED, VANISHED}
    want = want[~want["image"].isin([CHANGED, VANISHED])]
    got, want = _rows(got, KEY), _rows(want, KEY)
    assert len(got) == len(want) > 0
    for col in ("act_sum", "relevance_total", "input_relevance", "bias_relevance"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    for a, b in zip(got["token_map"], want["token_map"], strict=True):
        np.testing.assert_array_equal(a, b)

    dkey = ["image", "query", "module", "layer", "feature"]
    cg, cw = load_concepts(tmp_path / "OUT"), load_concepts(tmp_path / "ref")
    cw = cw[~cw["image"].isin([CHANGED, VANISHED])]
    cg, cw = cg.sort_values(dkey).reset_index(drop=True), cw.sort_values(dkey).reset_index(drop=True)
    assert len(cg) == len(cw) > 0
    np.testing.assert_array_equal(cg["relevance"].to_numpy(), cw["relevance"].to_numpy())
    assert not set(load_detections(tmp_path / "OUT")["image"]) & {CHANGED, VANISHED}

    # the request named those images with their checked content: running it again is another request
    with pytest.raises(BadRequest, match="images"):
        prepare(spec(images, tiny_config, tmp_path / "OUT"), log_fn=lambda s: None).release()

    # ... until they are back as they were: then the parts written without them are computed again
    (images / CHANGED).write_bytes(original)
    (images / VANISHED).write_bytes(vanished)
    again = run_sweep(spec(images, tiny_config, tmp_path / "OUT"), log_fn=lambda s: None, progress=False)
    assert again.exit_code == 0 and again.manifest["counts"]["images_failed"] == 0
    full, ref_rows = _rows(load(tmp_path / "OUT"), KEY), _rows(load(tmp_path / "ref"), KEY)
    assert len(full) == len(ref_rows)
    np.testing.assert_array_equal(full["relevance_total"].to_numpy(), ref_rows["relevance_total"].to_numpy())
    assert len(load_concepts(tmp_path / "OUT")) == len(load_concepts(tmp_path / "ref"))
    px_out, px_ref = (pd.read_parquet(tmp_path / d / "pixels") for d in ("OUT", "ref"))
    assert len(px_out) == len(px_ref)


def test_an_image_lost_in_a_resumed_run_leaves_no_rows_in_earlier_parts(ray_session, tiny_config, tmp_path):
    """Parts of its batch written by an earlier (interrupted) run held its rows: they are rewritten."""
    images = write_images(tmp_path / "images")
    out = tmp_path / "OUT"
    assert run_sweep(spec(images, tiny_config, out), log_fn=lambda s: None, progress=False).exit_code == 0
    for p in (out / "relevance").rglob("part-b00000-*.parquet"):  # as if interrupted: batch 0 half done
        if "decoder" in str(p):
            p.unlink()
    prep = prepare(spec(images, tiny_config, out), log_fn=lambda s: None)
    (images / CHANGED).unlink()   # b.png is in batch 0
    res = execute(prep, log_fn=lambda s: None, progress=False)
    assert res.exit_code == 1 and res.manifest["status"] == "complete"
    assert CHANGED not in set(load(out)["image"])
    assert CHANGED not in set(load_concepts(out)["image"])
    assert CHANGED not in set(pd.read_parquet(out / "pixels")["image"])
