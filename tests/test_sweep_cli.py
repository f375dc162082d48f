"""End to end through the CLI in a subprocess (its own local Ray): rows, duplicates, values = the engine."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from .conftest import run_cli

FEATURES = [0, 5, 17, 31]
KEY = ["module", "layer", "image", "feature", "query"]


def engine_rows(images, batch_size: int, config) -> pd.DataFrame:
    """The same request computed by calling the engine directly (no Ray, no sweep code)."""
    from lrp_ray.lrp import EngineConfig, LrpEngine
    from lrp_ray.models import load_model, preprocess, read_image

    model = load_model(config)
    engine = LrpEngine(model, EngineConfig(device="cpu"))
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
    frames = []
    for s in range(0, len(names), batch_size):
        batch_names = names[s:s + batch_size]
        cache = engine.forward(preprocess([read_image(images / n) for n in batch_names], model.cfg))
        for module, queries in (("encoder", None), ("decoder", "top2")):
            for layer in (0, 1):
                res = engine.relevance(cache, module, layer, FEATURES, queries)
                frames.append(res.to_frame(batch_names))
    df = pd.concat(frames, ignore_index=True)
    df["query"] = df["query"].fillna(-1).astype(int)
    return df.sort_values(KEY).reset_index(drop=True)


def test_cli_end_to_end_rows_and_values_equal_the_engine(tiny_images, tiny_config, tmp_path):
    out = tmp_path / "out"
    opts = ["--config", str(tiny_config)]
    args = ["--images", str(tiny_images), "--features", ",".join(map(str, FEATURES)), "--queries", "top2",
            "--batch-size", "2", "--feature-chunk", "2", "--actors", "2", "--address", "local",
            "--device", "cpu", "--out", str(out), *opts]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "encoder layer 0, features 0,5, batch 1/3 (2 images)" in proc.stdout
    assert "progress:" in proc.stdout  # the progress line of non-terminal output
    # nothing a newcomer would read as a failure (the weights are no actor constructor argument)
    assert "constructor arguments" not in proc.stdout + proc.stderr and " E " not in proc.stderr
    assert f"results: {out}" in proc.stdout
    df = pd.read_parquet(out / "relevance")
    df["module"] = df["module"].astype(str)
    df["layer"] = df["layer"].astype(int)
    df["query"] = df["query"].fillna(-1).astype(int)
    df = df.sort_values(KEY).reset_index(drop=True)
    n_targets = 2 * len(FEATURES) + 2 * len(FEATURES) * 2  # encoder + decoder (top2) over 2 layers each
    assert len(df) == 5 * n_targets
    assert not df.duplicated(KEY).any()
    want = engine_rows(tiny_images, 2, tiny_config)
    assert len(want) == len(df)
    pd.testing.assert_frame_equal(df[KEY], want[KEY], check_dtype=False)
    # fp32 sums in other thread counts / target chunks: equal up to rounding, relative to each column's scale
    for col in ("act_sum", "act_max", "act_mean", "relevance_total", "input_relevance", "bias_relevance"):
        np.testing.assert_allclose(df[col], want[col], rtol=1e-4, atol=1e-5 * np.abs(want[col]).max())
    for col in ("token_map", "channel_relevance", "profile"):
        scale = max(np.abs(v).max() for v in want[col])
        for a, b in zip(df[col], want[col], strict=False):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    m = json.loads((out / "manifest.json").read_text())
    assert m["forward_passes"] == m["counts"]["batches"] == 3
    assert m["status"] == "complete"
    assert m["run"]["nodes"] == ["127.0.0.1"]  # --address local binds to the loopback address


def test_unreachable_address_is_a_bad_request(tiny_images, tiny_config, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["--images", str(tiny_images), "--address", "127.0.0.1:1", "--out", str(out),
                    "--features", "0", "--config", str(tiny_config)], timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cannot start or reach Ray" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_no_arguments_runs_the_bundled_demo(tmp_path):
    proc = run_cli([], cwd=tmp_path, timeout=400, env={"RAY_ADDRESS": ""})
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "lrp_out"
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["images_ok"] >= 1
    df = pd.read_parquet(out / "relevance", columns=["image", "feature", "module", "layer"])
    assert len(df) == m["counts"]["maps_total"] > 0
    assert sorted(df.feature.unique()) == [0, 1, 2, 3]  # a quick first run: a few features ...
    assert set(df.module.astype(str)) == {"encoder", "decoder"}  # ... of every layer of both modules
    assert (out / "summary.csv").is_file() and (out / "errors.csv").is_file()
    # ... and explains every car the demo model finds: concepts, conditional maps, ranking, faithfulness
    dets = pd.read_parquet(out / "detections")
    assert len(dets) == m["detections"]["detections"] > 0 and set(dets["class_name"]) == {"car"}
    by_class = pd.read_csv(out / "concepts_by_class.csv")
    assert set(by_class["class_name"]) == {"car"} and len(by_class) == 6 * 64  # 3 + 3 layers x 64
    assert len(pd.read_parquet(out / "faithfulness")) == len(dets)
    assert "detections explained" in proc.stdout
