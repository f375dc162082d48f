"""Heatmap overlays: single PNGs and the bounded top-N writer over a results folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lrp_ray.results import SCHEMA, SCHEMA_VERSION, Manifest, ModelInfo, write_manifest
from lrp_ray.viz.heatmaps import heatmap_name, overlay_png, select_top_rows, write_top_heatmaps

PROFILE_NAMES = ["target", "decoder.2.ffn", "decoder.2.cross_attn", "encoder.input"]


def _scene_image(i: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = (220, 30, 30)
    return img


V1_COLUMNS = ("image", "image_h", "image_w", "feature", "query", "act_sum", "act_max", "act_mean",
              "relevance_total", "input_relevance", "bias_relevance", "token_map", "grid_h", "grid_w",
              "channel_relevance", "profile", "rules", "epsilon", "precision")
"""The columns of a version-1 part file (before geometry and pos/softmax relevance)."""


def write_fake_results(out: Path, n_images: int = 5, features=(0, 3, 7), hidden: int = 16,
                       layers=(("encoder", 1), ("decoder", 2)), version: int = SCHEMA_VERSION,
                       names: Sequence[str] | None = None) -> Path:
    """A results folder in the documented layout (Parquet rows, manifest, summary), with images.

    ``version`` 1 writes what the sweep wrote before: no geometry or pos/softmax columns, a manifest without
    ``version``. Rows account exactly: relevance_total = input + bias + pos + softmax (0 for version 1).
    """
    images = out / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    sizes = [(96, 160), (150, 100), (128, 128), (64, 200), (180, 120), (100, 100), (90, 140)]
    found = []
    for i in range(n_images):
        h, w = sizes[i % len(sizes)]
        name = names[i] if names else (f"img_{i}.png" if i % 2 == 0 else f"sub/img_{i}.jpg")
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_scene_image(i, h, w)).save(images / name)
        found.append((name, h, w))
    rng = np.random.default_rng(0)
    columns = SCHEMA.names if version >= 2 else V1_COLUMNS
    for module, layer in layers:
        rows = {k: [] for k in columns}
        for name, h, w in found:
            gh, gw = -(-h // 32), -(-w // 32)
            for f in features:
                for q in ([None] if module == "encoder" else [1, 4]):
                    tm = rng.normal(size=gh * gw).astype(np.float32)
                    act = float(rng.normal() * 3)
                    pos, soft = (0.02, -0.005) if version >= 2 else (0.0, 0.0)
                    row = {"image": name, "image_h": h, "image_w": w, "input_h": h, "input_w": w,
                           "stride": 32, "feature": f, "query": q, "act_sum": act, "act_max": act,
                           "act_mean": act / 4, "relevance_total": float(tm.sum()) + 0.01 + pos + soft,
                           "input_relevance": float(tm.sum()), "bias_relevance": 0.01, "pos_relevance": pos,
                           "softmax_relevance": soft, "token_map": tm.tolist(), "grid_h": gh, "grid_w": gw,
                           "channel_relevance": rng.normal(size=hidden).astype(np.float32).tolist(),
                           "profile": [act, act * 0.95, act * 0.9, float(tm.sum())], "rules": "cp",
                           "epsilon": 1e-6, "precision": "fp32"}
                    for k in columns:
                        rows[k].append(row[k])
        d = out / "relevance" / f"module={module}" / f"layer={layer}"
        d.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pydict(rows, schema=SCHEMA) if version >= 2 else pa.table(rows)
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), d / "part-0.parquet", row_group_size=7)
        pq.write_table(table.slice(half), d / "part-1.parquet", row_group_size=7)
    profile_names = {f"{m}/{lay}": PROFILE_NAMES for m, lay in layers}
    config = {"min_size_test": 800, "max_size_test": 1333, "res5_dilation": 1}
    if version >= 2:
        write_manifest(out, Manifest(status="complete", images_root=str(images), profile_names=profile_names,
                                     model=ModelInfo(config=config), spec={"rules": "cp"}))
    else:
        (out / "manifest.json").write_text(json.dumps({
            "status": "complete", "images_root": str(images), "model": {"dims": {}, "config": config},
            "profile_names": profile_names, "result_key": {"model": config}, "spec_hash": "0123"}))
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


def _capture_geometry(monkeypatch) -> list[tuple]:
    """Record the (image size, input_hw, stride) each overlay is drawn with."""
    import lrp_ray.viz.heatmaps as hm

    seen: list[tuple] = []
    real = hm.render_overlay

    def spy(img, token_map, title="", **kw):
        seen.append((img.shape[:2], kw.get("input_hw"), kw.get("stride")))
        return real(img, token_map, title, **kw)

    monkeypatch.setattr(hm, "render_overlay", spy)
    return seen


def test_heatmaps_use_row_geometry_and_manifest_images_root(tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(0,))
    rows = select_top_rows(out, top_n=2, load_maps=False)  # a results folder works as well
    assert rows and all(r.input_hw == r.image_hw and r.stride == 32 for r in rows)
    seen = _capture_geometry(monkeypatch)
    paths = write_top_heatmaps(out, top_n=1)  # images_root from the manifest
    assert len(paths) == 2 * 1 * 2
    # the rows' own input size and stride (the manifest's config would say 800 px and stride 32)
    assert seen and all(input_hw == hw and stride == 32 for hw, input_hw, stride in seen)


def test_heatmaps_of_version_1_outputs_use_the_manifest_config(tmp_path, monkeypatch):
    from lrp_ray.models.preprocess import resize_shape

    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(0,), version=1)
    rows = select_top_rows(out / "relevance", top_n=1)
    assert rows and all(r.input_hw is None and r.stride is None for r in rows)
    seen = _capture_geometry(monkeypatch)
    assert len(write_top_heatmaps(out, top_n=1)) == 4
    assert seen and all(input_hw == resize_shape(*hw, 800, 1333) and stride == 32
                        for hw, input_hw, stride in seen)
    with pytest.raises(FileNotFoundError, match="images_root"):
        (out / "manifest.json").unlink()
        write_top_heatmaps(out, top_n=1)
