"""The sweep driver on the session's local Ray (2 CPUs): rows, forward count, resume, refusal, failures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lrp_ray.sweep import BadRequest, run_sweep

from .conftest import KEY, assert_rows_equal, tiny_spec, write_images
from .conftest import load_rows as load
from .test_sweep_images import make_bad_images


def expected_keys(images: list[str], features=range(6), layers=(0, 1), queries=2) -> set:
    keys = set()
    for img in images:
        for layer in layers:
            for f in features:
                keys.add(("encoder", layer, img, f))
                for q in range(queries):
                    keys.add(("decoder", layer, img, f, q))
    return keys


def row_keys(df: pd.DataFrame) -> set:
    out = set()
    rank = df[df.module == "decoder"].groupby(["layer", "image", "feature"]).cumcount()
    for _i, r in enumerate(df.itertuples()):
        if r.module == "encoder":
            out.add((r.module, r.layer, r.image, r.feature))
        else:
            out.add((r.module, r.layer, r.image, r.feature, int(rank.loc[r.Index])))
    assert len(out) == len(df)
    return out


@pytest.fixture(scope="module")
def first_run(sweep_reference):
    return sweep_reference


def test_rows_forward_count_and_manifest(first_run, tiny_images):
    out, res, lines = first_run
    assert res.exit_code == 0, lines
    df = load(out)
    names = sorted(p.relative_to(tiny_images).as_posix() for p in tiny_images.rglob("*") if p.is_file())
    assert len(df) == 5 * 6 * 2 + 5 * 6 * 2 * 2  # images x targets
    assert not df.duplicated(KEY).any()
    assert row_keys(df) == expected_keys(names)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["batches"] == 3
    assert m["forward_passes"] == m["counts"]["batches"]  # one forward per image batch
    assert m["cache"]["cache_hits"] + m["cache"]["cache_transfers"] + m["forward_passes"] == 24
    assert m["counts"]["items_run"] == 24 and m["counts"]["maps_total"] == len(df)
    assert set(m["profile_names"]) == {"encoder/0", "encoder/1", "decoder/0", "decoder/1"}
    assert m["spec_hash"] and m["versions"]["ray"] and m["timings"]["total"] > 0
    assert m["peak_memory"]["driver_rss"] > 0
    t = m["timings"]
    for key in ("ray_start", "model_load", "plan", "sweep", "decode", "forward", "propagation", "writing"):
        assert t[key] >= 0, key
    assert t["ray_start"] > 0 and t["forward"] > 0 and t["propagation"] > 0 and t["writing"] > 0
    assert t["prepare"] <= t["total"] and t["sweep"] <= t["total"]
    for info in m["run"]["actors_info"]:
        for key in ("decode_seconds", "forward_seconds", "relevance_seconds", "load_seconds"):
            assert info["stats"][key] >= 0, key
    # benchmarks/sweep_cpu.py reads the whole split from the manifest
    from benchmarks.sweep_cpu import SPLIT_COLUMNS, CliRun, timing_split

    split = timing_split(CliRun(argv=[], out=out, manifest=m))
    assert {k: split[k]["source"] for k in SPLIT_COLUMNS} == dict.fromkeys(SPLIT_COLUMNS, "manifest")
    for info in m["run"]["actors_info"]:  # at most the batch in work and the next one, whatever the images
        assert info["stats"]["max_caches"] <= 2 and info["stats"]["evictions"] == 0
    assert any(line.startswith("encoder layer 0, features 0-2, batch 1/3 (2 images)") for line in lines)
    assert (out / "errors.csv").read_text().strip() == "image,reason"
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 * 2 * 6 and (summary.n_images == 5).all()
    # streamed over the part files (3 batches per partition) = pandas over the whole dataset
    g = df.groupby(["module", "layer", "feature"])
    want = pd.DataFrame({"relevance_mean": g.relevance_total.mean(),
                         "relevance_std": g.relevance_total.std(ddof=0),
                         "activation_std": g.act_mean.std(ddof=0), "n_rows": g.size()}).reset_index()
    got = summary.merge(want, on=["module", "layer", "feature"], suffixes=("", "_want"))
    assert len(got) == len(summary)
    for col in ("relevance_mean", "relevance_std", "activation_std", "n_rows"):
        np.testing.assert_allclose(got[col], got[f"{col}_want"], rtol=1e-9, atol=1e-12)


def test_resume_skips_finished_work_and_ends_with_the_same_rows(first_run, tiny_images, tiny_config,
                                                                tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    before = load(out)
    parts = sorted((out / "relevance").glob("module=*/layer=*/part-*.parquet"))
    removed = [p for p in parts if p.name.startswith(("part-b00001-c0000-", "part-b00002-c0001-"))][:3]
    assert removed
    for p in removed:
        p.unlink()
    lines: list[str] = []
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lines.append, progress=False)
    assert res.exit_code == 0
    m = res.manifest
    assert m["counts"]["items_skipped_resume"] == 24 - len(removed)
    assert m["counts"]["items_run"] == len(removed)
    assert m["forward_passes"] == len({p.name.split("-")[1] for p in removed})
    assert_rows_equal(load(out), before)
    # running it again computes nothing and writes nothing (works on read-only storage too)
    on_disk = json.loads((out / "manifest.json").read_text())
    lines.clear()
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config, cache_budget_mb=64), log_fn=lines.append,
                    progress=False)
    assert res.exit_code == 0 and any(x.startswith("already complete") for x in lines)
    assert res.manifest == on_disk == json.loads((out / "manifest.json").read_text())
    assert_rows_equal(load(out), before)
    # without its summary it is finished again: nothing computed, the earlier run kept in the history
    (out / "summary.csv").unlink()
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lines.append, progress=False)
    assert res.manifest["counts"]["items_run"] == 0 and res.manifest["forward_passes"] == 0
    assert res.manifest["history"][-1]["counts"]["items_run"] == len(removed)
    assert (out / "summary.csv").is_file()


def test_different_spec_is_refused_unless_overwrite(first_run, tiny_images, tiny_config, tmp_path):
    out, _, _ = first_run
    with pytest.raises(BadRequest, match=r"different sweep \(differs in: features\)"):
        run_sweep(tiny_spec(out, tiny_images, tiny_config, features="0-3"), log_fn=lambda s: None,
                  progress=False)
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(out, other)
    spec = tiny_spec(other, tiny_images, tiny_config, features="0-3", module="encoder", overwrite=True)
    res = run_sweep(spec, log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0
    df = load(other)
    assert set(df.module) == {"encoder"} and len(df) == 5 * 4 * 2


@pytest.mark.parametrize("how", ["sigkill", "gone"])
def test_actor_killed_mid_sweep_still_gives_the_exact_rows(ray_session, first_run, tiny_images, tiny_config,
                                                           tmp_path, how):
    """``sigkill``: SIGKILL to the actor's process (Ray restarts it); ``gone``: killed for good (replaced)."""
    import os
    import signal

    import ray

    handles: list = []
    killed: list = []

    def on_event(kind, **info):
        if kind == "actors_started":
            handles.extend(info["handles"])
        elif kind == "item_done" and not killed and info["done"] >= 2:
            victim = handles[info["actor"]]
            if how == "sigkill":
                os.kill(ray.get(victim.ping.remote(), timeout=30)["pid"], signal.SIGKILL)
            else:
                ray.kill(victim, no_restart=True)
            killed.append(info["actor"])

    out = tmp_path / "out"
    lines: list[str] = []
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lines.append, progress=False,
                    on_event=on_event)
    assert killed and res.exit_code == 0, lines
    assert_rows_equal(load(out), load(first_run[0]))
    rel = res.manifest["reliability"]
    assert rel["actor_restarts"] + rel["actors_replaced"] + rel["item_retries"] + rel["reassigned"] >= 1, rel


def test_bad_images_are_skipped_and_reported(ray_session, tiny_config, tmp_path):
    images = tmp_path / "images"
    expected = make_bad_images(images)
    write_images(images, {"good1.png": (64, 80), "nested/good2.jpg": (70, 64)})
    (images / "dup_of_good1.png").write_bytes((images / "good1.png").read_bytes())
    out = tmp_path / "out"
    lines: list[str] = []
    spec = tiny_spec(out, images, tiny_config, actors=1, module="encoder", layers="1", heatmaps=True)
    res = run_sweep(spec, log_fn=lines.append, progress=False)
    assert res.exit_code == 1
    errors = pd.read_csv(out / "errors.csv")
    assert set(errors.image) == set(expected) and errors.reason.str.len().min() > 0
    df = load(out)
    assert set(df.image) == {"good1.png", "nested/good2.jpg", "dup_of_good1.png"} and len(df) == 3 * 6
    assert res.manifest["duplicate_images"] == [["dup_of_good1.png", "good1.png"]]
    assert res.manifest["counts"]["images_failed"] == len(expected)
    assert any(f"{len(expected)} failed" in line for line in lines)
    pngs = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert res.manifest["heatmaps"]["files"] == len(pngs) == 6 * 2 * 3  # features x (act, rel) x top 3



def test_one_actor_small_cache_budget_gives_the_same_values(ray_session, first_run, tiny_images, tiny_config,
                                                             tmp_path):
    out = tmp_path / "out"
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config, actors=1, cache_budget_mb=1, max_in_flight=1),
                    log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0
    assert res.manifest["forward_passes"] == 3 and res.manifest["cache"]["cache_transfers"] == 0
    (info,) = res.manifest["run"]["actors_info"]
    assert info["stats"]["max_caches"] == 1 and info["stats"]["evictions"] == 0  # memory stays flat
    assert_rows_equal(load(out), load(first_run[0]))
