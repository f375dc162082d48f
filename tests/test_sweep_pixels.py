"""``--pixels topN``: after the token sweep, pixel maps for exactly each feature's reference rows, equal to
the pixel entry point called directly, exactly once, resumable, part of the request's identity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lrp_ray.results import load
from lrp_ray.sweep import BadRequest, SweepSpec, run_sweep
from lrp_ray.sweep.preparation import prepare

TOP = 2


def px_spec(out, **kw) -> SweepSpec:
    base = {"module": "both", "layers": "1", "features": "0-2", "queries": "top2", "batch_size": 3,
            "pixels": f"top{TOP}", "pixel_max_side": 64, "out": str(out), "actors": 2}
    return SweepSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("px_sweep") / "OUT"
    res = run_sweep(px_spec(out), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0, res.manifest.get("failed_items")
    return out, res


def _expected_picks(out) -> set[tuple]:
    """Each feature's top rows by act_mean and by input_relevance, from the token rows with pandas."""
    rows = load(out, columns=["module", "layer", "image", "feature", "query", "act_mean", "input_relevance"])
    rows["query"] = rows["query"].fillna(-1).astype(int)
    picks = set()
    for (m, layer, f), g in rows.groupby(["module", "layer", "feature"], observed=True):
        for col in ("act_mean", "input_relevance"):
            top = g.sort_values([col, "image", "query"], ascending=[False, True, True]).head(TOP)
            picks |= {(str(m), int(layer), int(f), str(r.image), int(r.query)) for r in top.itertuples()}
    return picks


def test_pixel_maps_exactly_for_the_reference_rows(swept):
    out, res = swept
    px = pd.read_parquet(out / "pixels")
    got = [(str(r.module), int(r.layer), int(r.feature), str(r.image),
            -1 if pd.isna(r.query) else int(r.query)) for r in px.itertuples()]
    assert len(got) == len(set(got))  # exactly once
    assert set(got) == _expected_picks(out)
    assert res.manifest["pixels"]["maps"] == len(got) == res.manifest["pixels"]["maps_run"]
    assert res.manifest["pixels"]["composite"]["pixel_name"] == "EpsilonPlusFlat"
    assert (px[["pixel_h", "pixel_w"]].max(axis=1) <= 64).all()
    for m, h, w, total in zip(px["pixel_map"], px["pixel_h"], px["pixel_w"], px["pixel_relevance"],
                              strict=True):
        assert len(m) == h * w and np.isclose(np.sum(m, dtype=np.float64), total, rtol=1e-4, atol=1e-6)


def test_pixel_maps_equal_the_entry_point_called_directly(swept):
    """The sweep's rows = ``feature_pixel_maps`` on the same batch, outside Ray (plumbing, not rules:
    the rules are tested against zennit in tests/test_pixels*.py)."""
    from lrp_ray.api import engine_for, load_model
    from lrp_ray.models import preprocess, read_image
    from lrp_ray.pixels import feature_pixel_maps
    from lrp_ray.sweep.images import DEMO_IMAGES

    out, _ = swept
    px = pd.read_parquet(out / "pixels")
    model = load_model(None, None)
    engine = engine_for(model, device="cpu")
    names = sorted(p.relative_to(DEMO_IMAGES).as_posix() for p in DEMO_IMAGES.rglob("*")
                   if p.is_file() and p.suffix != ".json")
    checked = 0
    for s in range(0, len(names), 3):
        batch_names = names[s:s + 3]
        batch = preprocess([read_image(DEMO_IMAGES / n) for n in batch_names], model.cfg)
        cache = engine.forward(batch)
        for module, queries in (("encoder", None), ("decoder", "top2")):
            pm = feature_pixel_maps(engine, cache, batch, module, 1, [0, 1, 2], queries, max_side=64)
            for b, name in enumerate(batch_names):
                for n in range(pm.maps.shape[1]):
                    q = int(pm.queries[b, n]) if pm.queries is not None else -1
                    sel = px[(px.module == module) & (px.image == name) & (px.feature == int(pm.features[n]))
                             & (px["query"].fillna(-1).astype(int) == q)]
                    if len(sel):
                        want = pm.pixel_map(b, n).ravel()
                        np.testing.assert_allclose(sel["pixel_map"].iloc[0], want, rtol=1e-4, atol=1e-6)
                        checked += 1
    assert checked == len(px)


def test_a_lost_pixel_part_is_computed_again(ray_session, swept, tmp_path):
    import shutil

    ref, _ = swept
    out = tmp_path / "OUT"
    shutil.copytree(ref, out)
    victim = sorted((out / "pixels").glob("part-*.parquet"))[1]
    victim.unlink()
    res = run_sweep(px_spec(out), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0 and res.manifest["counts"]["items_run"] == 1
    a = pd.read_parquet(out / "pixels").sort_values(["module", "feature", "image", "query"])
    b = pd.read_parquet(ref / "pixels").sort_values(["module", "feature", "image", "query"])
    assert len(a) == len(b)
    for x, y in zip(a["pixel_map"], b["pixel_map"], strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"pixel_composite": "Nonsense"}, "unknown composite 'Nonsense'"),
    ({"target": "detections"}, "pixel maps are computed for feature targets"),
])
def test_bad_pixel_requests_are_one_line(tmp_path, kw, needle):
    with pytest.raises(BadRequest) as err:
        prepare(px_spec(tmp_path / "OUT", **kw), log_fn=lambda s: None).release()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_pixels_syntax_is_checked_when_read():
    with pytest.raises(ValueError, match="topN"):
        SweepSpec(pixels="all")


def test_the_composite_is_part_of_the_request(tmp_path):
    a = prepare(px_spec(tmp_path / "a"), log_fn=lambda s: None)
    b = prepare(px_spec(tmp_path / "b", pixel_composite="EpsilonGammaBox"), log_fn=lambda s: None)
    try:
        assert a.hash != b.hash and "pixels" in a.result.differences(b.result.model_dump(mode="json"))
    finally:
        a.release()
        b.release()


def test_the_atlas_shows_pixel_maps_where_they_exist_and_says_so(swept, tmp_path):
    """Reference pictures with a pixel map are drawn from it (captioned 'pixel map'), the others from
    the token map ('token map'); every picture a page names is on disk."""
    import re
    import shutil

    from lrp_ray.report import build_report

    out = tmp_path / "OUT"
    shutil.copytree(swept[0], out)
    build_report(out, workers=1)
    px = pd.read_parquet(out / "pixels", columns=["module", "layer", "feature", "image"])
    n_pixel_captions = 0
    for (module, layer, feature), rows in px.groupby(["module", "layer", "feature"]):
        page = (out / "atlas" / "features" / f"{module}-{layer}-{feature}.html").read_text()
        captions = re.findall(r"<figcaption><b>(#\d+ by (?:activation|relevance))</b>: "
                              r"[^<]*?(pixel|token) map<br>([^<]*)</figcaption>", page)
        pixel_refs = {(img, rank) for rank, kind, img in captions if kind == "pixel"}
        assert {img for img, _ in pixel_refs} == set(rows["image"])  # each mapped image, as a pixel map
        assert any(kind == "token" for _, kind, _ in captions)  # the others stay token maps
        n_pixel_captions += len(pixel_refs)
        for src in re.findall(r'src="\.\./(img/[^"]+)"', page):
            assert (out / "atlas" / src).is_file(), src
    assert n_pixel_captions >= len(px)  # each pixel-mapped reference row is shown as one


def test_pixel_parts_of_another_request_are_never_read(swept, tmp_path):
    import shutil

    from lrp_ray.results.pixels import pixel_files, read_pixel_maps

    out = tmp_path / "OUT"
    shutil.copytree(swept[0], out)
    n_files, n_maps = len(pixel_files(out)), len(read_pixel_maps(out))
    part = sorted((out / "pixels").glob("part-*.parquet"))[0]
    shutil.copy(part, part.with_name(part.name.rsplit("-", 1)[0] + "-ffffffffffffffff.parquet"))
    assert (len(pixel_files(out)), len(read_pixel_maps(out))) == (n_files, n_maps)


def test_the_reports_commands_are_requests_the_cli_accepts(swept):
    """The atlas prints the run's command and one per feature: both parse as the same request (the
    per-feature one narrowed, into its own folder)."""
    import shlex

    from lrp_ray.report.folder import sweep_command
    from lrp_ray.results import read_manifest
    from lrp_ray.sweep.cli import parse_request

    out, _ = swept
    manifest = read_manifest(out)
    whole, _ = parse_request(shlex.split(sweep_command(manifest, out))[3:])
    for k in ("module", "layers", "features", "queries", "batch_size", "pixels", "pixel_max_side"):
        assert getattr(whole, k) == manifest.spec[k], k
    one, _ = parse_request(shlex.split(sweep_command(manifest, out, module="encoder", layers="1",
                                                     features="2"))[3:])
    assert (one.module, one.layers, one.features, one.pixels) == ("encoder", "1", "2", whole.pixels)
    assert one.out != whole.out
