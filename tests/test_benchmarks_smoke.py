"""The benchmark scripts run (tiny sizes): the GPU run's --smoke on the CPU, the FLOP counter, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "benchmarks" / "gpu" / "run_all.py"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _tiny_engine_and_cache(ffn_maps: bool = False):
    from benchmarks.sweep_cpu import TINY
    from lrp_ray.lrp import EngineConfig, LrpEngine
    from lrp_ray.models import DetrConfig, build_model, preprocess

    torch.manual_seed(0)
    cfg = DetrConfig().with_overrides(TINY)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((64, 96), (80, 64))]
    engine = LrpEngine(model, EngineConfig(device="cpu", ffn_maps=ffn_maps))
    return engine, engine.forward(preprocess(imgs, cfg))


def test_flop_count_matches_flop_counter():
    """The analytic count of benchmarks/gpu/flops.py is what FlopCounterMode sees (exactly), for encoder and
    decoder targets, directly and through the per-token maps. Fails when the engine's products change."""
    from benchmarks.gpu.flops import cross_check

    engine, cache = _tiny_engine_and_cache()
    rows = cross_check(engine, cache, layer=1, features=4)
    assert len(rows) == 5, rows
    for row in rows:
        assert "error" not in row, row
        assert row["counted"] > 0 and row["analytic"] == row["counted"], row


def test_flop_count_terms():
    from benchmarks.gpu.flops import KEYS, ffn_map_build_flops, propagation_flops

    kw = dict(B=4, T=850, d=256, dff=2048, H=8, layers=6)
    one = propagation_flops(N=1, detail=True, **kw)
    many = propagation_flops(N=256, detail=True, **kw)
    assert one["total"] == sum(one[k] for k in KEYS)
    assert one["counted_equiv"] == one["total"] - one["gemv"]
    assert many["total"] == 256 * one["total"]                  # linear in the number of targets
    assert propagation_flops(N=256, ffn_maps=True, **kw) < many["total"]
    dec = propagation_flops(N=1, module="decoder", Q=100, enc_layers=6, **kw)
    assert dec > one["total"]                                   # a decoder target crosses every encoder layer
    assert ffn_map_build_flops(4, 850, 256, 2048, 6) > 0
    with pytest.raises(ValueError):
        propagation_flops(B=1, T=1, d=10, dff=4, H=3, N=1, layers=1)


@pytest.mark.parametrize("script", ["benchmarks/gpu/run_all.py", "benchmarks/sweep_cpu.py",
                                    "benchmarks/memory_scaling.py"])
def test_help(script):
    p = _run([script, "--help"], timeout=120)
    assert p.returncode == 0, p.stderr
    assert "usage" in p.stdout.lower()


def test_run_all_budget_skips_parts(tmp_path):
    """With no time left every part is skipped, and still writes its JSON + Markdown."""
    p = _run([str(RUN_ALL), "--smoke", "--out", str(tmp_path), "--budget", "1", "--min-left", "60"],
             timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for part in ("correctness", "propagation", "baselines", "sweep"):
        data = json.loads((tmp_path / f"{part}.json").read_text())
        assert data["status"] == "skipped" and "budget" in data["reason"]
        assert (tmp_path / f"{part}.md").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_all_smoke(tmp_path):
    """Every part of the GPU run at tiny size on the CPU (the sweep part through the CLI if Ray imports)."""
    out = tmp_path / "out"
    p = _run([str(RUN_ALL), "--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--quiet-sweep"],
             timeout=540)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) == 8, files        # 4 parts x (json, md): what a device run can bring back
    parts = {name: json.loads((out / f"{name}.json").read_text())
             for name in ("correctness", "propagation", "baselines", "sweep")}
    for name, data in parts.items():
        assert data["status"] == "ok", (name, data.get("error"))
    assert parts["correctness"]["all_pass"]
    assert all(r["rel_diff"] == 0 for r in parts["propagation"]["flop_check"])
    rows = parts["propagation"]["rows"]
    want = {(p, m, mod) for p in ("fp32", "bf16") for m in ("direct", "ffn_maps")
            for mod in ("encoder", "decoder")}
    assert {(r["precision"], r["mode"], r["module"]) for r in rows} == want
    assert all(r["count_rel_diff"] == 0 for r in rows)
    base = parts["baselines"]["rows"][0]
    assert base["max_rel_diff_vs_seed"] < 1e-4 and base["max_rel_diff_vs_autograd"] < 1e-4
    sweep = parts["sweep"]
    if "skipped" not in sweep:
        assert sweep["rc"] == 0 and sweep["complete"], sweep.get("log_tail")
        assert sweep["maps"] == sweep["maps_total"] > 0
        assert sweep["items_logged"] == sweep["n_items"] > 0   # the CLI's item log lines were understood
        assert sweep["split"]["ray_start"]["s"] is not None


def test_concepts_cpu_smoke(tmp_path):
    """benchmarks/concepts_cpu.py at tiny size: concept profile and K conditional maps, ours and the
    autograd baselines computing the same maps (no timing assertions)."""
    p = _run(["benchmarks/concepts_cpu.py", "--smoke", "--quiet", "--out", str(tmp_path)], timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    data = json.loads((tmp_path / "concepts_cpu.json").read_text())
    assert (tmp_path / "concepts_cpu.md").is_file()
    assert data["status"] == "ok" and len(data["cases"]) == 2
    for case in data["cases"]:
        assert case["profile_max_rel_diff"] < 1e-4
        assert [p["top"] for p in case["profiles"]][0] == 1
        assert {r["module"] for r in case["conditional"]} == {"encoder", "decoder"}
        for row in case["conditional"]:
            assert row["k"] >= 8 and row["ours_s"] > 0 and row["hook_s"] > 0 and row["restart_s"] > 0
            assert row["max_rel_diff_restart"] < 1e-4 and row["max_rel_diff_hook"] < 1e-4, row
