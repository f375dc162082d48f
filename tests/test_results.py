"""lrp_ray.results: the row schema, the dataset reader, the manifest, and notebook frames = sweep rows.

Real images (the bundled demo scenes), the bundled demo model, real Parquet files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lrp_ray import results
from lrp_ray.api import engine_for, explain
from lrp_ray.models import DetrConfig, load_model, preprocess, read_image
from lrp_ray.sweep.images import DEMO_IMAGES
from lrp_ray.sweep.writer import write_part

from .test_viz_heatmaps import V1_COLUMNS, write_fake_results

KEY = ["module", "layer", "image", "feature", "query"]
LISTS = ("token_map", "channel_relevance", "profile")


@pytest.fixture(scope="module")
def demo_model():
    return load_model(None, None, [], device="cpu")


@pytest.fixture(scope="module")
def demo_images() -> list[Path]:
    return sorted(p for p in DEMO_IMAGES.iterdir() if p.suffix.lower() in (".png", ".jpg"))[:4]


def _write_result(out: Path, res, names, sizes, cfg, chunk: int = 0) -> Path:
    rel = f"module={res.module}/layer={res.layer}/part-b00000-c{chunk:04d}.parquet"
    return write_part(out / "relevance", rel, results.result_to_table(res, names, sizes, cfg=cfg))


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEY, na_position="first").reset_index(drop=True)


def _assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert dict(a.dtypes) == dict(b.dtypes)
    a, b = _sorted(a), _sorted(b)
    scalars = [c for c in a.columns if c not in LISTS]
    pd.testing.assert_frame_equal(a[scalars], b[scalars], check_exact=True)
    for col in LISTS:
        for x, y in zip(a[col], b[col], strict=True):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------- schema
def test_schema_columns_and_types():
    s = results.SCHEMA
    assert results.FRAME_COLUMNS[:2] == ("module", "layer")
    assert results.FRAME_COLUMNS[2:] == tuple(s.names)
    ints = ("image_h", "image_w", "input_h", "input_w", "grid_h", "grid_w", "stride", "feature", "query")
    for name in ints:
        assert s.field(name).type == pa.int32(), name
    for name in ("relevance_total", *results.CONSERVATION_PARTS):
        assert s.field(name).type == pa.float64(), name
    assert s.field("token_map").type == pa.list_(pa.float32())
    assert results.SCHEMA_VERSION == 2
    # one schema: the writer re-exports the results module's objects
    from lrp_ray.sweep import writer

    assert writer.SCHEMA is results.SCHEMA and writer.result_to_table is results.result_to_table
    assert writer.atomic_write_text is results.atomic_write_text


def test_backbone_stride_from_config():
    assert results.backbone_stride(DetrConfig()) == 32
    assert results.backbone_stride(DetrConfig(res5_dilation=2)) == 16


def test_one_image_extension_list():
    import lrp_ray.api as api
    from lrp_ray.sweep import images

    assert api.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS


# ---------------------------------------------------------------------- notebook frames = sweep rows
@pytest.mark.parametrize("module,queries", [("encoder", None), ("decoder", "top2")])
def test_explain_frame_equals_parquet_rows(tmp_path, demo_model, demo_images, module, queries):
    """api.explain and RelevanceResult.to_frame give the columns, dtypes and values of results.load."""
    eng = engine_for(demo_model, device="cpu")
    feats = [0, 5, 63]
    df = explain(demo_model, demo_images, module, 1, feats, queries=queries, batch_size=4, engine=eng)
    names = [str(p) for p in demo_images]
    batch = preprocess([read_image(p) for p in demo_images], demo_model.cfg)
    res = eng.relevance(eng.forward(batch), module, 1, feats, queries)
    _write_result(tmp_path, res, names, batch.image_sizes, demo_model.cfg)
    loaded = results.load(tmp_path)
    assert len(loaded) == len(df) == len(demo_images) * len(feats) * (2 if queries else 1)
    _assert_same_rows(df, loaded)
    _assert_same_rows(res.to_frame(names, batch.image_sizes, cfg=demo_model.cfg), loaded)
    # the geometry is the image's: original size from the file, resized input, its own token grid
    for r in loaded.drop_duplicates("image").itertuples():
        h, w = read_image(r.image).shape[:2]
        assert (r.image_h, r.image_w) == (h, w)
        i = names.index(r.image)
        assert (r.input_h, r.input_w) == tuple(batch.input_sizes[i])
        assert r.stride == 32
        assert (r.grid_h, r.grid_w) == (math.ceil(r.input_h / 32), math.ceil(r.input_w / 32))
    assert all(len(m) == gh * gw for m, gh, gw in zip(loaded.token_map, loaded.grid_h, loaded.grid_w,
                                                        strict=True))
    # records are the same rows, as Python values
    recs = res.records(names, batch.image_sizes, cfg=demo_model.cfg)
    assert [set(r) for r in recs[:1]] == [set(results.FRAME_COLUMNS)]
    assert recs[0]["query"] is None if module == "encoder" else isinstance(recs[0]["query"], int)


def test_frames_without_geometry_keep_dtypes(demo_model, demo_images):
    eng = engine_for(demo_model, device="cpu")
    res = eng.relevance(eng.forward(preprocess([read_image(demo_images[0])], demo_model.cfg)), "encoder", 0,
                        [1])
    df = res.to_frame()
    assert list(df.columns) == list(results.FRAME_COLUMNS)
    assert df["image"].tolist() == ["0"] and df[["image_h", "input_h", "stride"]].isna().all().all()
    assert dict(df.dtypes) == dict(results.empty_frame().dtypes)
    assert str(df["stride"].dtype) == "Int32" and str(df["grid_h"].dtype) == "int32"


def test_explain_without_readable_images_has_the_columns(demo_model, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    df = explain(demo_model, tmp_path, "encoder", 0, [0], device="cpu")
    assert len(df) == 0 and list(df.columns) == list(results.FRAME_COLUMNS)


# ------------------------------------------------------------------------------------ conservation
@pytest.mark.parametrize("rules", ["cp", "attnlrp"])
def test_conservation_from_outputs_alone_is_exact_for_epsilon_zero(tmp_path, demo_model, demo_images, rules):
    eng = engine_for(demo_model, rules=rules, epsilon=0.0, device="cpu", precision="fp64")
    batch = preprocess([read_image(p) for p in demo_images[:2]], demo_model.cfg)
    cache = eng.forward(batch)
    names = [p.name for p in demo_images[:2]]
    for module, queries in (("encoder", None), ("decoder", "all")):
        _write_result(tmp_path, eng.relevance(cache, module, 2, [3, 17], queries), names, batch.image_sizes,
                      demo_model.cfg)
    rows = results.load(tmp_path)
    residual = results.conservation_residual(rows)
    scale = np.abs(rows["relevance_total"]).max()
    assert np.abs(residual).max() <= 1e-9 * scale
    # the check needs every part: input + bias alone misses pos/softmax relevance under attnlrp
    partial = rows["relevance_total"] - rows["input_relevance"] - rows["bias_relevance"]
    if rules == "attnlrp":
        assert np.abs(partial).max() > 1e-6 * scale
        assert np.abs(rows["softmax_relevance"]).max() > 0
    table = results.conservation(tmp_path)
    assert list(table.columns) == results.CONSERVATION_COLUMNS
    assert sorted(zip(table.module, table.layer, strict=True)) == [("decoder", 2), ("encoder", 2)]
    assert (table.rel_error <= 1e-9).all() and (table.rows_unchecked == 0).all()


def test_conservation_is_approximate_with_epsilon_and_finds_a_broken_row(tmp_path, demo_model, demo_images):
    eng = engine_for(demo_model, device="cpu")  # cp, epsilon 1e-6, fp32
    batch = preprocess([read_image(p) for p in demo_images[:2]], demo_model.cfg)
    names = [p.name for p in demo_images[:2]]
    _write_result(tmp_path, eng.relevance(eng.forward(batch), "encoder", 1, [0, 1, 2]), names,
                  batch.image_sizes, demo_model.cfg)
    table = results.conservation(tmp_path)
    assert 0 < table.rel_error.iloc[0] < 1e-3
    # a row whose parts do not add up is found from the files
    f = results.part_files(tmp_path)[0]
    t = pq.read_table(f)
    bad = pc.add(t.column("bias_relevance"), pa.array([0.5] + [0.0] * (t.num_rows - 1)))
    pq.write_table(t.set_column(t.schema.get_field_index("bias_relevance"), "bias_relevance", bad), f)
    assert results.conservation(tmp_path).max_abs_error.iloc[0] == pytest.approx(0.5, rel=1e-3)


# ------------------------------------------------------------------------------------------- reader
def test_load_projection_filters_and_only_complete_parts(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(0, 3, 7))
    full = results.load(out)
    assert len(full) == 3 * 3 + 3 * 3 * 2
    assert set(zip(full.module, full.layer, strict=True)) == {("encoder", 1), ("decoder", 2)}
    assert dict(full.dtypes) == dict(results.empty_frame().dtypes)
    # temp files of an unfinished write and stray files are not rows
    d = out / "relevance" / "module=encoder" / "layer=1"
    (d / ".part-9.parquet.tmp-123").write_bytes(b"partial")
    pq.write_table(pq.read_table(d / "part-0.parquet"), d / "notes.parquet")
    assert len(results.load(out)) == len(full)
    assert len(results.part_files(out)) == 4
    assert results.part_files(out) == results.part_files(out / "relevance")
    # projection: only those columns, in the asked order
    few = results.load(out, columns=["layer", "image", "act_sum"])
    assert list(few.columns) == ["layer", "image", "act_sum"] and len(few) == len(full)
    # filters: DNF lists and pyarrow expressions
    enc = results.load(out, filters=[("module", "=", "encoder"), ("feature", "in", [0, 7])])
    assert len(enc) == 3 * 2 and set(enc.feature) == {0, 7} and enc["query"].isna().all()
    dec = results.load(out, columns=["query"], filters=pc.field("layer") == 2)
    assert sorted(set(dec["query"])) == [1, 4]
    with pytest.raises(ValueError, match="unknown result columns"):
        results.load(out, columns=["nope"])
    empty = results.load(tmp_path / "missing")
    assert len(empty) == 0 and list(empty.columns) == list(results.FRAME_COLUMNS)


def test_version_1_outputs_still_read(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=(1,), version=1)
    assert pq.read_schema(results.part_files(out)[0]).names == list(V1_COLUMNS)
    df = results.load(out)
    assert len(df) == 2 + 2 * 2
    assert df[["input_h", "input_w", "stride", "pos_relevance", "softmax_relevance"]].isna().all().all()
    assert df["image_h"].notna().all()
    m = results.read_manifest(out)
    assert m is not None and m.version == 1 and m.spec_hash == "0123"
    assert m.input_geometry() == ((800, 1333), 32)
    table = results.conservation(out)
    assert (table.rows_unchecked == table.rows).all() and table.rel_error.isna().all()
    from lrp_ray.sweep.summary import write_summary

    assert len(write_summary(out)) == 2


# ----------------------------------------------------------------------------------------- manifest
def _sweep_manifest() -> dict:
    """A manifest as the sweep writes it at the end of a run (every section)."""
    return {
        "status": "complete", "spec": {"features": "0-5"}, "spec_hash": "abc", "result_spec": {"rules": "cp"},
        "run_spec": {"out": "x"}, "out": "/o", "images_root": "/i", "versions": {"lrp_ray": "0.1.0"},
        "model": {"dims": {"encoder": 2}, "config": {"min_size_test": 64, "max_size_test": 128,
                                                     "res5_dilation": 2}},
        "selection": {"layers": {"encoder": "0-1"}, "features": "0-5", "queries": "top2"},
        "duplicate_images": [["a.png", "b.png"]],
        "run": {"ray": "local", "nodes": ["127.0.0.1"], "actors": 2, "device": "cpu", "actors_info": [{}]},
        "counts": {"images_found": 5, "images_ok": 5, "images_failed": 0, "batches": 3, "items_total": 12,
                   "items_skipped_resume": 0, "items_run": 12, "items_failed": 0, "maps_total": 60,
                   "maps_run": 60, "rows_written_this_run": 60, "summary_rows": 12},
        "forward_passes": 3, "cache": {"cache_hits": 1, "cache_transfers": 0, "exports": 0},
        "reliability": {"item_retries": 0, "duplicate_results": 0, "reassigned": 0},
        "failed_items": {}, "error": None, "timings": {"total": 1.5},
        "peak_memory": {"driver_rss": 1 << 20, "actors": {"1": 5}},
        "profile_names": {"encoder/1": ["a", "b"]},
        "heatmaps": {"dir": "/o/heatmaps", "files": 4, "seconds": 0.5},
    }


def test_manifest_round_trip_version_and_atomic_write(tmp_path):
    written = results.write_manifest(tmp_path, _sweep_manifest())
    assert written.version == results.SCHEMA_VERSION
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["version"] == results.SCHEMA_VERSION and raw["counts"]["maps_run"] == 60
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left
    m = results.read_manifest(tmp_path)
    assert m == written
    assert m.counts.items_total == 12 and m.run.nodes == ["127.0.0.1"] and m.heatmaps.files == 4
    assert m.input_geometry() == ((64, 128), 16)
    assert m.profile_names_for("encoder", 1) == ["a", "b"] and m.profile_names_for("decoder", 0) is None
    # a running manifest (only the base sections) is valid too
    base = {k: v for k, v in _sweep_manifest().items() if k in (
        "status", "spec", "spec_hash", "result_spec", "run_spec", "out", "images_root", "versions", "model",
        "selection", "duplicate_images")}
    results.write_manifest(tmp_path, {**base, "status": "running"})
    m = results.read_manifest(tmp_path)
    assert m.status == "running" and m.counts is None and m.result_spec == {"rules": "cp"}


def test_manifest_reader_old_unreadable_and_unknown_keys(tmp_path):
    assert results.read_manifest(tmp_path) is None
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({"status": "complete", "spec_hash": "x", "result_key": {"rules": "cp"},
                             "future_key": 1}))
    m = results.read_manifest(tmp_path)
    assert m.version == 1 and m.result_key == {"rules": "cp"} and m.model_extra == {"future_key": 1}
    with pytest.raises(results.ManifestError, match="unknown keys future_key"):
        results.write_manifest(tmp_path, m)
    with pytest.raises(results.ManifestError, match=r"counts\.typo"):
        results.write_manifest(tmp_path, {**_sweep_manifest(), "counts": {"typo": 1}})
    assert json.loads(p.read_text())["future_key"] == 1  # a refused write leaves the file alone
    for bad in ("{not json", "[1, 2]", json.dumps({"counts": {"images_ok": "many"}})):
        p.write_text(bad)
        assert results.read_manifest(tmp_path) is None
        with pytest.raises(results.ManifestError):
            results.read_manifest(tmp_path, strict=True)
