"""Pixel maps in heatmap PNGs and their Parquet rows: kind labels, placement, results-folder integration."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import lrp_ray.viz.heatmaps as hm
from lrp_ray.pixels import PixelMaps, block_sum
from lrp_ray.results.pixels import PIXEL_SCHEMA, PIXELS_DIR, pixel_table, read_pixel_maps
from tests.test_viz_heatmaps import write_fake_results


def _label(**kw) -> str:
    fig = hm.overlay_figure(np.zeros((60, 90, 3), np.uint8), np.ones((30, 45)), "t", **kw)
    try:
        return fig.axes[1].get_ylabel()
    finally:
        plt.close(fig)


def test_colour_bar_says_which_kind_of_map():
    assert _label() == "token relevance"
    assert _label(kind="pixel") == "pixel relevance"
    with pytest.raises(ValueError, match="kind"):
        _label(kind="pixels")


def test_pixel_extent_covers_the_summed_blocks():
    assert hm.pixel_extent((480, 640), (160, 214)) == (480.0, 642.0)
    assert hm.pixel_extent((120, 180), (120, 180)) == (120.0, 180.0)
    assert hm.pixel_extent((100, 100), (7, 3)) == (100.0, 100.0)  # not a block sum: stretched


def test_pixel_overlay_is_placed_on_the_image(tmp_path):
    img = np.full((120, 200, 3), 200, np.uint8)
    full = np.zeros((120, 200))
    full[10:30, 150:190] = 1.0                      # hot patch top right, in image pixels
    m = block_sum(full, 2)                           # the reduced map (60 x 100)
    p = hm.overlay_png(img, m, tmp_path / "p.png", "pixel", kind="pixel", width_px=500)
    im = np.asarray(Image.open(p).convert("RGB")).astype(float)
    # image axes: x from 0.03*500 over 0.78*500 px; the hot patch is at 75-95 % of the width
    x_hot = int(0.03 * 500 + 0.78 * 500 * 0.85)
    x_cold = int(0.03 * 500 + 0.78 * 500 * 0.2)
    rows = im[:, x_hot]
    red = (rows[:, 0] - rows[:, 2]).max()
    rows_c = im[:, x_cold]
    assert red > 30 and (rows_c[:, 0] - rows_c[:, 2]).max() < 10


def test_pixel_rows_round_trip_and_heatmaps_use_them(tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    images = write_fake_results(out, n_images=3, features=(0, 3), layers=(("encoder", 1),))
    rows = hm.select_top_rows(out, top_n=1, load_maps=False)
    r = rows[0]
    h, w = r.image_hw
    maps = np.zeros((1, 1, h // 2, w // 2), np.float32)
    maps[0, 0, 3, 4] = 2.0
    pm = PixelMaps(composite="EpsilonPlusFlat", identity={}, max_side=None, maps=maps,
                   shape_hw=np.array([[h // 2, w // 2]]), pixel_relevance=np.array([[2.0]]),
                   token_relevance=np.array([[2.5]]), features=np.array([r.feature]),
                   queries=np.array([[-1]]))
    table = pixel_table(pm, "encoder", 1, [r.image])
    assert table.schema == PIXEL_SCHEMA and table.num_rows == 1
    (out / PIXELS_DIR).mkdir()
    pq.write_table(table, out / PIXELS_DIR / "part-0.parquet")
    got = read_pixel_maps(out)
    key = ("encoder", 1, r.feature, r.image, None)
    np.testing.assert_array_equal(got[key], maps[0, 0])
    kinds = []
    real = hm.render_overlay

    def spy(img, m, title="", **kw):
        kinds.append((kw.get("kind", "token"), m.shape))
        return real(img, m, title, **kw)

    monkeypatch.setattr(hm, "render_overlay", spy)
    hm.write_top_heatmaps(out, images, top_n=1)
    assert ("pixel", (h // 2, w // 2)) in kinds
    assert any(k == "token" for k, _ in kinds)
