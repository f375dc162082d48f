"""Clusters: cluster.yaml validated by Ray, a two-node cluster losing a node mid-sweep, and `ray job submit`.

The multi-node and job tests run in subprocesses with their own Ray (this process holds the session's
local instance); they are marked slow but run in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import REPO

RAY_BIN = str(Path(sys.executable).with_name("ray"))


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_for_ray():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = _validate(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert any("pip install" in c and "lrp_ray" in c for c in prepared["setup_commands"])
    assert "~/lrp_ray" in prepared["file_mounts"]
    # a typo in a key fails Ray's validation (what CI relies on)
    bad = {**config, "max_worker": 2}
    with pytest.raises(Exception, match="max_worker"):
        _validate(bad)
    typo = yaml.safe_load((REPO / "cluster.yaml").read_text())
    typo["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        _validate(typo)


MULTI_NODE_CHILD = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from lrp_ray.sweep import SweepSpec, run_sweep

images, out, config = sys.argv[1], sys.argv[2], sys.argv[3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
state = {"removed": False, "nodes_before": len([n for n in ray.nodes() if n["Alive"]])}

def on_event(kind, **info):
    if kind == "item_done" and not state["removed"] and info["done"] >= 3:
        cluster.remove_node(worker, allow_graceful=False)
        state["removed"] = True

spec = SweepSpec(images=images, config=config, out=out, batch_size=2, features="0-5", feature_chunk=3,
                 actors=2, cpus_per_actor=1, queries="top2", ping_timeout_s=5, device="cpu")
res = run_sweep(spec, progress=False, on_event=on_event)
print("RESULT " + json.dumps({"exit": res.exit_code, "removed": state["removed"],
                              "nodes_before": state["nodes_before"], "manifest": res.manifest}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def _keys(df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(module=df["module"].astype(str), layer=df["layer"].astype(int),
                   query=df["query"].fillna(-1).astype(int))
    return df.sort_values(["module", "layer", "image", "feature", "query"]).reset_index(drop=True)


@pytest.mark.slow
def test_two_node_cluster_loses_a_worker_node_mid_sweep(tiny_images, tiny_config, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-c", MULTI_NODE_CHILD, str(tiny_images), str(out),
                           str(tiny_config)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["removed"] and result["nodes_before"] == 2
    assert result["exit"] == 0 and result["manifest"]["status"] == "complete"
    df = _keys(pd.read_parquet(out / "relevance"))
    assert len(df) == 5 * 6 * 2 + 5 * 6 * 2 * 2
    assert not df.duplicated(["module", "layer", "image", "feature", "query"]).any()
    enc = df[df.module == "encoder"]
    assert set(map(tuple, enc[["layer", "image", "feature"]].values)) == {
        (layer, img, f) for layer in (0, 1) for img in set(df.image) for f in range(6)}
    dec = df[df.module == "decoder"].groupby(["layer", "image", "feature"]).size()
    assert len(dec) == 2 * 5 * 6 and (dec == 2).all()
    rel = result["manifest"]["reliability"]
    assert rel["reassigned"] + rel["item_retries"] + rel["actors_replaced"] + rel["actor_restarts"] >= 1, rel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tiny_images, tiny_config, tmp_path):
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="lrpj", dir="/tmp")  # short: Ray's socket paths have a length limit
    results_root = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAY_USAGE_STATS_ENABLED": "0",
                "LRP_RAY_RESULTS": str(results_root)})
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    head = subprocess.Popen(
        [RAY_BIN, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         # not the default agent port (52365): another Ray of this test session may hold it
         "--dashboard-agent-listen-port", str(agent),
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            ping = subprocess.run([RAY_BIN, "job", "list", "--address", address], env=env,
                                  capture_output=True, text=True, timeout=60)
            if ping.returncode == 0:
                break
            assert head.poll() is None, head.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, ping.stderr[-2000:]
            time.sleep(2)
        sub_id = f"lrp-test-{uuid.uuid4().hex[:8]}"
        opts = ["--config", str(tiny_config)]
        cmd = [RAY_BIN, "job", "submit", "--address", address, "--submission-id", sub_id, "--no-wait",
               "--working-dir", str(REPO),
               "--", "python", "-m", "lrp_ray.sweep", "--images", str(tiny_images), "--module", "encoder",
               "--layers", "1", "--features", "0-3", "--batch-size", "3", "--actors", "1", "--out", "job_out",
               *opts]
        deadline = time.monotonic() + 120
        while True:  # the head answers before its node's job agent is up ("try again later")
            sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            if sub.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        deadline = time.monotonic() + 300
        while True:
            status = subprocess.run([RAY_BIN, "job", "status", "--address", address, sub_id], env=env,
                                    capture_output=True, text=True, timeout=60)
            text = (status.stdout + status.stderr).lower()
            if any(w in text for w in ("succeeded", "failed", "stopped")) or time.monotonic() > deadline:
                break
            time.sleep(2)
        logs = subprocess.run([RAY_BIN, "job", "logs", "--address", address, sub_id], env=env,
                              capture_output=True, text=True, timeout=60).stdout
        assert "succeeded" in text, text[-1000:] + logs[-4000:]
        out = results_root / "job_out"  # a relative --out inside a job lands under $LRP_RAY_RESULTS
        assert f"results: {out}" in logs
        df = pd.read_parquet(out / "relevance")
        assert len(df) == 5 * 4 and not df.duplicated(["image", "feature"]).any()
        m = json.loads((out / "manifest.json").read_text())
        assert m["status"] == "complete" and m["forward_passes"] == 2
        assert "Ray cluster" in m["run"]["ray"]
    finally:
        os.kill(head.pid, signal.SIGTERM)  # `ray start --block` then stops the processes it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:  # stragglers of the session we created for it
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
