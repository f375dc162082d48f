"""Heatmap overlays: single PNGs and the bounded top-N writer over a results folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lrp_ray.viz.heatmaps import heatmap_name, overlay_png, select_top_rows, write_top_heatmaps

PROFILE_NAMES = ["target", "decoder.2.ffn", "decoder.2.cross_attn", "encoder.input"]


def _scene_image(i: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = (220, 30, 30)
    return img


def write_fake_results(out: Path, n_images: int = 5, features=(0, 3, 7), hidden: int = 16,
                       layers=(("encoder", 1), ("decoder", 2))) -> Path:
    """A results folder in the documented layout (Parquet rows, manifest, summary), with images."""
    images = out / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    sizes = [(96, 160), (150, 100), (128, 128), (64, 200), (180, 120), (100, 100), (90, 140)]
    names = []
    for i in range(n_images):
        h, w = sizes[i % len(sizes)]
        name = f"img_{i}.png" if i % 2 == 0 else f"sub/img_{i}.jpg"
        Image.fromarray(_scene_image(i, h, w)).save(images / name)
        names.append((name, h, w))
    rng = np.random.default_rng(0)
    for module, layer in layers:
        rows = {k: [] for k in ("image", "image_h", "image_w", "feature", "query", "act_sum", "act_max",
                                "act_mean", "relevance_total", "input_relevance", "bias_relevance",
                                "token_map", "grid_h", "grid_w", "channel_relevance", "profile", "rules",
                                "epsilon", "precision")}
        for name, h, w in names:
            gh, gw = max(1, h // 32), max(1, w // 32)
            for f in features:
                for q in ([None] if module == "encoder" else [1, 4]):
                    tm = rng.normal(size=gh * gw).astype(np.float32)
                    act = float(rng.normal() * 3)
                    rows["image"].append(name)
                    rows["image_h"].append(h)
                    rows["image_w"].append(w)
                    rows["feature"].append(f)
                    rows["query"].append(q)
                    rows["act_sum"].append(act)
                    rows["act_max"].append(act)
                    rows["act_mean"].append(act / 4)
                    rows["relevance_total"].append(act * 0.9 + float(rng.normal()))
                    rows["input_relevance"].append(float(tm.sum()))
                    rows["bias_relevance"].append(0.01)
                    rows["token_map"].append(tm.tolist())
                    rows["grid_h"].append(gh)
                    rows["grid_w"].append(gw)
                    rows["channel_relevance"].append(rng.normal(size=hidden).astype(np.float32).tolist())
                    rows["profile"].append([act, act * 0.95, act * 0.9, float(tm.sum())])
                    rows["rules"].append("cp")
                    rows["epsilon"].append(1e-6)
                    rows["precision"].append("fp32")
        d = out / "relevance" / f"module={module}" / f"layer={layer}"
        d.mkdir(parents=True, exist_ok=True)
        table = pa.table(rows)
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), d / "part-0.parquet", row_group_size=7)
        pq.write_table(table.slice(half), d / "part-1.parquet", row_group_size=7)
    (out / "manifest.json").write_text(json.dumps({
        "images_root": str(images), "model": {"config": "demo"}, "profile_names": PROFILE_NAMES,
        "rules": "cp", "n_images": n_images}))
    (out / "summary.csv").write_text("module,layer,rows\n" + "".join(
        f"{m},{lay},{n_images * len(features)}\n" for m, lay in layers))
    return images


def test_overlay_png_size_title_and_colourbar(tmp_path):
    img = _scene_image(0, 120, 200)
    m = np.zeros((4, 7))
    m[1, 2] = 3.0
    m[3, 5] = -1.0
    p = overlay_png(img, m, tmp_path / "a" / "x.png", "decoder layer 2 feature 5 | 3.0", width_px=500)
    im = np.asarray(Image.open(p).convert("RGB")).astype(float)
    assert im.shape[1] == 500 and 250 < im.shape[0] < 420
    # The colour bar column (right of the image) carries the whole diverging scale: red top, blue bottom.
    x = int(0.03 * 500 + 0.78 * 500 + 0.03 * 500 + 0.0175 * 500)
    col = im[:, x]
    assert col.std() > 20
    reds = (col[:, 0] > 150) & (col[:, 2] < 100)
    blues = (col[:, 2] > 150) & (col[:, 0] < 100)
    assert reds.any() and blues.any()
    assert np.argmax(reds) < np.argmax(blues)  # red (positive) above blue (negative)
    # Zero is white-ish: the map is symmetric, so the middle of the bar is light.
    # Overlay: the hot token region is reddish relative to a zero region.
    assert im.std() > 10


def test_overlay_flat_map_needs_grid(tmp_path):
    with pytest.raises(ValueError):
        overlay_png(_scene_image(1, 64, 64), np.ones(6), tmp_path / "x.png")
    p = overlay_png(_scene_image(1, 64, 64), np.zeros(6), tmp_path / "x.png", grid_hw=(2, 3))
    assert p.is_file()


def test_write_top_heatmaps_bounded_and_named(tmp_path):
    out = tmp_path / "OUT"
    images = write_fake_results(out, n_images=5, features=(0, 3, 7))
    paths = write_top_heatmaps(out, images, top_n=2)
    # 2 layers x 3 features x 2 rankings x top 2.
    assert len(paths) == 2 * 3 * 2 * 2
    names = {p.name for p in paths}
    assert heatmap_name("encoder", 1, 3, "act", 1) in names
    assert heatmap_name("decoder", 2, 7, "rel", 2) in names
    for p in paths:
        assert p.parent == out / "heatmaps"
        with Image.open(p) as im:
            assert im.size[0] == 560 and im.size[1] > 150
    # More images do not mean more files.
    out2 = tmp_path / "OUT2"
    images2 = write_fake_results(out2, n_images=7, features=(0, 3, 7))
    assert len(write_top_heatmaps(out2, images2, top_n=2)) == len(paths)


def test_select_top_rows_orders_by_score_distinct_images(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=5, features=(0, 3))
    rows = select_top_rows(out / "relevance", top_n=3)
    df = pq.read_table(out / "relevance").to_pandas()
    for r in rows:
        assert r.token_map is not None and r.token_map.shape == r.grid_hw
    dec = [r for r in rows if r.module == "decoder" and r.feature == 3 and r.kind == "act"]
    assert [r.rank for r in dec] == [1, 2, 3]
    assert len({r.image for r in dec}) == 3
    sub = df[(df.module == "decoder") & (df.feature == 3)]
    best = sub.groupby("image")["act_sum"].max().sort_values(ascending=False)
    assert [r.image for r in dec] == list(best.index[:3])
    assert dec[0].score == pytest.approx(best.iloc[0])
    # The token map read back is the one of that row.
    top = sub[sub.act_sum == best.iloc[0]].iloc[0]
    np.testing.assert_allclose(dec[0].token_map.ravel(), np.asarray(top.token_map, dtype=np.float32))
