"""Plan (work items), the Parquet writer (rows = the engine's own records) and the summary, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lrp_ray.lrp import EngineConfig, LrpEngine
from lrp_ray.models import load_model, preprocess, read_image
from lrp_ray.sweep.plan import make_plan
from lrp_ray.sweep.spec import DEFAULT_ITEM_FEATURES
from lrp_ray.sweep.summary import SUMMARY_COLUMNS, write_summary
from lrp_ray.sweep.writer import SCHEMA, clean_temp_files, done_keys, result_to_table, write_part

from .conftest import TINY_SIZES


def test_plan_items_and_keys():
    images = [f"img{i}.png" for i in range(7)]
    plan = make_plan(images, 3, {"encoder": [0, 1], "decoder": [2]}, list(range(10)), 4,
                     {"encoder": 1, "decoder": 5})
    assert [len(b.images) for b in plan.batches] == [3, 3, 1]
    assert len(plan.items) == 3 * 3 * 3  # batches x (module, layer) x feature chunks
    assert len({(it.module, it.layer, it.key) for it in plan.items}) == len(plan.items)
    assert len({it.part_relpath for it in plan.items}) == len(plan.items)
    assert plan.total_maps == 7 * 10 * 2 + 7 * 10 * 5
    it = plan.by_batch[2][-1]
    assert it.part_relpath == "module=decoder/layer=2/part-b00002-c0002.parquet"  # no request tag given
    tagged = make_plan([f"i{k}.png" for k in range(7)], 3, {"encoder": [0]}, [0], 4, {"encoder": 1},
                       tag="abc")
    assert tagged.items[0].part_relpath == "module=encoder/layer=0/part-b00000-c0000-abc.parquet"
    assert it.label(3) == "decoder layer 2, features 8-9, batch 3/3 (1 image)"
    assert plan.by_batch[0][0].label(3) == "encoder layer 0, features 0-3, batch 1/3 (3 images)"
    auto = make_plan(images, 4, {"encoder": [5]}, list(range(256)), "auto", {"encoder": 1})
    n = DEFAULT_ITEM_FEATURES
    assert [len(i.features) for i in auto.by_batch[0]] == [n] * (256 // n)


@pytest.fixture(scope="module")
def engine_and_batch(tiny_images, tiny_config):
    torch.manual_seed(0)
    model = load_model(tiny_config)
    engine = LrpEngine(model, EngineConfig(device="cpu"))
    names = sorted(TINY_SIZES)[:3]
    batch = preprocess([read_image(tiny_images / n) for n in names], model.cfg)
    return engine, engine.forward(batch), names, batch.image_sizes, model.cfg, batch.input_sizes


@pytest.mark.parametrize("module,queries", [("encoder", None), ("decoder", "top2")])
def test_rows_match_engine_records(engine_and_batch, module, queries):
    engine, cache, names, sizes, cfg, input_sizes = engine_and_batch
    res = engine.relevance(cache, module, 1, [0, 7, 31], queries)
    table = result_to_table(res, names, sizes)
    assert table.schema.equals(SCHEMA)
    # every relevance sink is a column: the accounting can be checked from the rows alone
    for col, arr in (("relevance_total", res.target_relevance), ("input_relevance", res.input_relevance),
                     ("bias_relevance", res.bias_relevance), ("pos_relevance", res.pos_relevance),
                     ("softmax_relevance", res.softmax_relevance)):
        np.testing.assert_array_equal(table.column(col).to_numpy(), np.asarray(arr, np.float64).reshape(-1))
    # geometry: unknown without the model config (null), derived from it with one
    assert table.column("stride").null_count == table.num_rows
    geo = result_to_table(res, names, sizes, cfg=cfg)
    assert set(geo.column("stride").to_pylist()) == {32}
    n = table.num_rows // len(names)
    hs, ws = geo.column("input_h").to_pylist()[::n], geo.column("input_w").to_pylist()[::n]
    got = list(zip(hs, ws, strict=True))
    assert got == [tuple(s) for s in input_sizes]
    assert geo.drop(["input_h", "input_w", "stride"]).equals(table.drop(["input_h", "input_w", "stride"]))
    recs = res.records(names)
    assert table.num_rows == len(recs) == 3 * 3 * (2 if queries else 1)
    rows = table.to_pylist()
    for got, want in zip(rows, recs, strict=False):
        for key in ("image", "feature", "query", "grid_h", "grid_w", "rules", "precision"):
            assert got[key] == want[key], key
        for key in ("act_sum", "act_max", "act_mean", "relevance_total", "input_relevance", "bias_relevance",
                    "epsilon"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        for key in ("token_map", "channel_relevance", "profile"):
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, atol=1e-9)
        assert len(got["token_map"]) == got["grid_h"] * got["grid_w"]
        assert (got["image_h"], got["image_w"]) == tuple(TINY_SIZES[got["image"]])


def test_writer_atomic_resume_listing_and_summary(engine_and_batch, tmp_path, monkeypatch):
    engine, cache, names, sizes, _, _ = engine_and_batch
    ds = tmp_path / "relevance"
    for layer in (0, 1):
        for ci, feats in enumerate(([0, 1], [2, 3])):
            res = engine.relevance(cache, "encoder", layer, feats)
            write_part(ds, f"module=encoder/layer={layer}/part-b00000-c{ci:04d}.parquet",
                       result_to_table(res, names, sizes))
    res = engine.relevance(cache, "decoder", 0, [0, 1, 2, 3], "top2")
    write_part(ds, "module=decoder/layer=0/part-b00000-c0000.parquet", result_to_table(res, names, sizes))
    (ds / "module=encoder" / "layer=0" / ".part-b00009-c0000.parquet.tmp-123").write_bytes(b"partial")
    assert len(done_keys(ds)) == 5
    df = pd.read_parquet(ds)  # temp files are ignored by pyarrow (leading dot)
    assert len(df) == 2 * 4 * 3 + 4 * 3 * 2
    assert set(df["module"].astype(str)) == {"encoder", "decoder"}
    assert df.loc[df["module"] == "encoder", "query"].isna().all()
    assert clean_temp_files(ds) == 1
    summary = write_summary(tmp_path)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 2 * 4 + 4
    enc = summary[(summary.module == "encoder") & (summary.layer == 1) & (summary.feature == 2)].iloc[0]
    rows = df[(df.module == "encoder") & (df.layer.astype(int) == 1) & (df.feature == 2)]
    assert enc.n_images == 3 and enc.relevance_mean == pytest.approx(rows.relevance_total.mean())
    assert enc.activation_std == pytest.approx(rows.act_mean.std(ddof=0))
    top = rows.sort_values("input_relevance", ascending=False).image.tolist()
    assert list(enc.top5_images_by_relevance) == top
    mean_ch = np.stack(rows.channel_relevance.to_list()).mean(0)
    assert list(enc.top10_channels) == list(np.argsort(-mean_ch, kind="stable")[:10])
    dec = summary[summary.module == "decoder"]
    assert (dec.n_rows == 3 * 2).all() and (dec.n_images == 3).all()
    on_disk = pd.read_csv(tmp_path / "summary.csv")
    assert len(on_disk) == len(summary)
    assert [json.loads(v) for v in on_disk.top5_images_by_relevance] == [
        list(v) for v in summary.top5_images_by_relevance]
    stored = pd.read_parquet(tmp_path / "summary.parquet")
    assert [list(v) for v in stored.top10_channels] == [list(v) for v in summary.top10_channels]
    # one part file at a time (the streamed merge) = all at once
    import lrp_ray.sweep.summary as summary_mod

    monkeypatch.setattr(summary_mod, "_CHUNK_BYTES", 1)
    one_by_one = write_summary(tmp_path)
    pd.testing.assert_frame_equal(one_by_one, summary, check_exact=False, rtol=1e-12)


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    import csv

    from lrp_ray.sweep.images import ImageError
    from lrp_ray.sweep.summary import write_errors

    names = ["=cmd|calc.jpg", "+1.png", "@a.png", "-x.png", "ok|name.png"]
    write_errors(tmp_path, [ImageError(n, "=HYPERLINK(\"x\")") for n in names])
    rows = list(csv.reader((tmp_path / "errors.csv").open()))[1:]
    assert [r[0] for r in rows] == ["'=cmd|calc.jpg", "'+1.png", "'@a.png", "'-x.png", "ok|name.png"]
    assert all(r[1].startswith("'=") for r in rows)
