"""Detection targets through the sweep: the same rows as the notebook API, exactly once, complete on disk,
a per-class ranking that pandas reproduces from the concepts, and one-line refusals of bad selections."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lrp_ray.results.detections import (
    load_concept_maps,
    load_concepts,
    load_detections,
    read_concepts_by_class,
    read_faithfulness,
)
from lrp_ray.sweep import BadRequest, SweepSpec, run_sweep
from lrp_ray.sweep.preparation import prepare

LAYERS = {"encoder": [1], "decoder": [1]}
DET_KEY = ["image", "query", "class_id"]


def det_spec(out, **kw) -> SweepSpec:
    base = {"target": "detections", "detections": "class=car", "module": "both", "layers": "1",
            "top_concepts": 3, "batch_size": 3, "faithfulness": True, "out": str(out), "actors": 2}
    return SweepSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_sweep") / "OUT"
    res = run_sweep(det_spec(out), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0, res.manifest.get("failed_items")
    return out, res


@pytest.fixture(scope="module")
def api_frames():
    from lrp_ray.api import explain_detections, load_model
    from lrp_ray.demo import CLASS_NAMES
    from lrp_ray.sweep.images import DEMO_IMAGES

    model = load_model(None, None)
    images = sorted(p for p in DEMO_IMAGES.rglob("*") if p.is_file() and p.suffix != ".json")
    ex = explain_detections(model, images, "class=car", layers=LAYERS, top_concepts=3, batch_size=3,
                            class_names=CLASS_NAMES, device="cpu")
    return ex, [p.name for p in images]


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    df = df.copy()
    df["image"] = df["image"].map(lambda s: str(s).rsplit("/", 1)[-1])
    return df.sort_values(keys).reset_index(drop=True)


def test_detection_sweep_equals_the_notebook_api(swept, api_frames):
    out, res = swept
    ex, names = api_frames
    dets = load_detections(out)
    assert len(dets) == len(ex.detections) > 0 and set(dets["class_name"]) == {"car"}
    assert res.manifest["detections"]["detections"] == len(dets)
    a, b = _sorted(dets, DET_KEY), _sorted(ex.detections, DET_KEY)
    for c in ("query", "class_id", "grid_h", "grid_w", "image_h", "image_w"):
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c
    for c in ("score", "x0", "y1", "logit", "input_relevance", "bias_relevance"):
        np.testing.assert_allclose(a[c], b[c], rtol=1e-5, atol=1e-6, err_msg=c)
    for x, y in zip(a["token_map"], b["token_map"], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    ckey = [*DET_KEY, "module", "layer", "feature"]
    ca, cb = _sorted(load_concepts(out), ckey), _sorted(ex.concepts, ckey)
    assert len(ca) == len(dets) * 2 * 64  # every channel of both layers, once per detection
    assert not ca.duplicated(ckey).any()
    np.testing.assert_allclose(ca["relevance"], cb["relevance"], rtol=1e-4, atol=1e-6)
    mkey = [*DET_KEY, "module", "layer", "rank"]
    ma, mb = _sorted(load_concept_maps(out), mkey), _sorted(ex.heatmaps, mkey)
    assert len(ma) == len(dets) * 2 * 3
    assert (ma["feature"].to_numpy() == mb["feature"].to_numpy()).all()
    # each conditional map is that of one of the detection's 3 most relevant channels, in rank order
    top = ca.sort_values([*DET_KEY, "module", "layer", "relevance"], ascending=[True] * 5 + [False])
    top3 = top.groupby([*DET_KEY, "module", "layer"]).head(3)
    assert (top3["feature"].to_numpy() == ma["feature"].to_numpy()).all()


def test_faithfulness_and_manifest_counts(swept):
    out, res = swept
    faith = read_faithfulness(out)
    dets = load_detections(out)
    assert len(faith) == len(dets)
    assert set(map(tuple, faith[DET_KEY].astype(str).to_numpy())) == set(map(tuple, dets[DET_KEY].astype(
        str).to_numpy()))
    info = res.manifest["detections"]
    assert info["pointing_game"] == pytest.approx(faith["pointing_hit"].mean())
    assert info["per_class"] == {"car": len(dets)}
    assert all(len(f) == len(c) for f, c in zip(faith["fractions"], faith["curve_relevance"], strict=True))


def test_concepts_by_class_is_what_pandas_computes_from_the_concepts(swept):
    out, _ = swept
    c = pd.read_parquet(out / "concepts")  # plain pandas over the dataset folder
    c["rank"] = c.groupby(["image", "query", "class_id", "module", "layer"])["relevance"].rank(
        ascending=False, method="first")
    g = c.groupby(["class_id", "module", "layer", "feature"])
    want = pd.DataFrame({"share_mean": g["share"].mean(), "share_std": g["share"].std(ddof=1),
                         "top_k_rate": g["rank"].apply(lambda r: float((r <= 3).mean())),
                         "detections": g.size()}).reset_index()
    got = read_concepts_by_class(out)
    assert len(got) == len(want)
    merged = got.merge(want, on=["class_id", "module", "layer", "feature"], suffixes=("", "_want"))
    assert len(merged) == len(want)
    for col in ("share_mean", "share_std", "top_k_rate"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_want"], rtol=1e-9, atol=1e-12, err_msg=col)
    assert (merged["detections"] == merged["detections_want"]).all()
    # sorted so that a class's first rows are its most used features
    car = got[got["class_id"] == 0]["share_mean"].to_numpy()
    assert (np.diff(car) <= 0).all()


def test_a_lost_or_short_detection_part_is_computed_again(ray_session, tmp_path, swept):
    ref_out, _ = swept
    out = tmp_path / "OUT"
    assert run_sweep(det_spec(out), log_fn=lambda s: None, progress=False).exit_code == 0
    maps = sorted((out / "concept_maps").glob("part-*.parquet"))
    maps[0].unlink()                                    # lost
    concepts = sorted((out / "concepts").glob("part-*.parquet"))
    t = pq.read_table(concepts[-1])
    pq.write_table(t.slice(0, t.num_rows // 2), concepts[-1])  # short (but a valid Parquet file)
    res = run_sweep(det_spec(out), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0 and res.manifest["counts"]["items_run"] == 2
    assert res.manifest["counts"]["items_missing"] == 0
    for name, loader, key in (("concepts", load_concepts, ["image", "query", "module", "layer", "feature"]),
                              ("concept_maps", load_concept_maps, ["image", "query", "module", "layer",
                                                                     "rank"])):
        a, b = loader(out).sort_values(key), loader(ref_out).sort_values(key)
        assert len(a) == len(b), name
        np.testing.assert_array_equal(a["relevance"].to_numpy(), b["relevance"].to_numpy())


@pytest.mark.parametrize(("kw", "needle"), [
    ({"detections": "class=bogus"}, "unknown class 'bogus'"),
    ({"detections": "999:0"}, "query 999 out of range"),
    ({"detections": "1:77"}, "class id 77 out of range"),
    ({"class_names": "no/such/names.txt"}, "file not found"),
    ({"class_names": ["car"]}, "1 names for a model with"),
])
def test_bad_detection_requests_are_refused_in_one_line(tmp_path, kw, needle):
    with pytest.raises(BadRequest) as err:
        prepare(det_spec(tmp_path / "OUT", **kw), log_fn=lambda s: None).release()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize(("text", "needle"), [
    ("car\ncar\ndisc\nbar\n", "'car' names classes 0 and 1"),
    ("car\n\ntriangle\nbar\n", "class 1 has an empty name"),
])
def test_ambiguous_or_empty_class_names_are_refused(tmp_path, text, needle):
    names = tmp_path / "names.txt"
    names.write_text(text)
    with pytest.raises(BadRequest, match=needle):
        prepare(det_spec(tmp_path / "OUT", class_names=str(names)), log_fn=lambda s: None).release()


def test_a_class_names_file_with_a_byte_order_mark_reads_as_text(tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes("car\ndisc\ntriangle\nbar\n".encode("utf-8-sig"))
    prep = prepare(det_spec(tmp_path / "OUT", class_names=str(names)), log_fn=lambda s: None)
    try:
        assert prep.result.detections["class_names"][0] == "car"
        assert prep.result.detections["selection"] == "class=0"
    finally:
        prep.release()


@pytest.mark.parametrize("kw", [{"detections": "top3"}, {"faithfulness": True}, {"top_concepts": 2},
                                {"pixel_composite": "EpsilonFlat"}, {"pixel_max_side": 64}])
def test_options_without_their_target_are_refused(kw):
    from lrp_ray.sweep.spec import merge_flags

    with pytest.raises(BadRequest, match="only for"):
        merge_flags({}, {"features": "0", **kw})


def test_a_yaml_pair_read_as_a_number_gets_a_hint(tmp_path):
    from lrp_ray.sweep.spec import load_spec

    job = tmp_path / "job.yaml"
    job.write_text("target: detections\ndetections: 12:2\n")
    with pytest.raises(BadRequest, match="quote"):
        load_spec(job)


def test_bad_selection_syntax_is_refused_when_read():
    with pytest.raises(ValueError, match="query:class_id"):
        SweepSpec(detections="3:x")
    with pytest.raises(ValueError):
        SweepSpec(top_concepts=-1)


def test_a_feature_request_hashes_as_before_detection_targets_and_pixels(tmp_path):
    """Without detection targets or pixel maps the digest is that of the result spec without those two
    keys, as before they existed: folders of earlier versions still resume."""
    import hashlib

    prep = prepare(SweepSpec(features="0-1", layers="0", out=str(tmp_path / "o")), log_fn=lambda s: None)
    try:
        assert prep.result.detections is None and prep.result.pixels is None
        old = prep.result.model_dump_json(exclude={"detections", "pixels"})
        assert "detections" not in json.loads(old)
        assert prep.hash == hashlib.sha256(old.encode()).hexdigest()[:16]
        other = prepare(SweepSpec(features="0-1", layers="0", out=str(tmp_path / "p"), target="both"),
                        log_fn=lambda s: None)
        assert other.hash != prep.hash
        other.release()
    finally:
        prep.release()


def test_parts_of_another_request_are_never_read(swept, tmp_path):
    """A part with another request's digest in a detection dataset (left behind, copied in) is ignored."""
    import shutil

    out = tmp_path / "OUT"
    shutil.copytree(swept[0], out)
    loaders = (("concepts", load_concepts), ("detections", load_detections),
               ("concept_maps", load_concept_maps))
    before = {name: len(fn(out)) for name, fn in loaders}
    for name in before:
        part = sorted((out / name).glob("part-*.parquet"))[0]
        shutil.copy(part, part.with_name(part.name.rsplit("-", 1)[0] + "-ffffffffffffffff.parquet"))
    after = {name: len(fn(out)) for name, fn in loaders}
    assert after == before
