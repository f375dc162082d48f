"""Faults: the driver killed, output that cannot be written, caches larger than the budget, a long soak.

Exact equality throughout: the engine is deterministic per work item (fp32, CPU, same threads per actor),
so an interrupted, resumed or rescheduled sweep must equal an uninterrupted one value for value.
(Actors killed with SIGKILL: ``test_sweep_driver``; a worker node removed: ``test_sweep_cluster``.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lrp_ray.sweep import run_sweep
from lrp_ray.sweep.writer import SCHEMA, write_part

from .conftest import assert_rows_equal, load_rows, run_cli, tiny_spec, write_images

DEV_FULL = Path("/dev/full")


def _parts(out: Path) -> list[Path]:
    return sorted((out / "relevance").glob("module=*/layer=*/part-*.parquet"))


def _temp_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "relevance").rglob(".*") if ".tmp-" in p.name)


# ------------------------------------------------------------------------------------ the driver killed
def _wait_for_parts(proc: subprocess.Popen, out: Path, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(_parts(out)) < n:
        assert proc.poll() is None, f"the sweep ended (rc {proc.returncode}) before {n} parts were written"
        assert time.monotonic() < deadline, f"fewer than {n} parts after {timeout}s"
        time.sleep(0.05)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this test started (Ray processes of a killed CLI)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.slow
def test_driver_sigkill_then_ctrl_c_then_resume_equals_an_uninterrupted_run(ray_session, tiny_images,
                                                                            tiny_config, tmp_path):
    args = ["--images", str(tiny_images), "--config", str(tiny_config), "--features", "0-15",
            "--feature-chunk", "1", "--batch-size", "2", "--actors", "1", "--address", "local",
            "--device", "cpu"]
    total = 3 * 2 * 2 * 16  # batches x modules x layers x feature chunks of 1
    ref = tmp_path / "reference"  # uninterrupted, in this process (same request: same arithmetic)
    spec = tiny_spec(ref, tiny_images, tiny_config, features="0-15", feature_chunk=1, queries="top1",
                     actors=1)
    assert run_sweep(spec, log_fn=lambda s: None, progress=False).exit_code == 0

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lrp_ray.sweep", *args, "--out", str(out)]
    # 1. SIGKILL of the CLI process (no handler runs; its Ray processes are cleaned up by the test)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_parts(proc, out, 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        time.sleep(1.0)
        _kill_group(proc.pid)
    assert proc.returncode == -signal.SIGKILL
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"  # never finalised
    killed_at = len(_parts(out))
    assert 5 <= killed_at < total
    for p in _parts(out):  # what is there is complete
        assert pq.read_metadata(p).num_rows > 0
    # 2. the same command, interrupted with Ctrl-C (SIGINT) after some more work
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_parts(proc, out, killed_at + 5)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=120)
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 130, log[-3000:]
    assert f"resuming: {killed_at} of {total} work items already done" in log
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    partial = len(_parts(out))
    assert killed_at + 5 <= partial < total
    # 3. the same command again: finishes, computing only what is missing
    again = run_cli([*args, "--out", str(out)])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["items_skipped_resume"] == partial
    assert m["counts"]["items_run"] == total - partial
    assert not _temp_files(out)
    assert_rows_equal(load_rows(out), load_rows(ref))
    assert (out / "summary.csv").read_text() == (ref / "summary.csv").read_text()


# ------------------------------------------------------------------------------ output cannot be written
@pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full")
def test_a_part_that_cannot_be_written_leaves_no_file(tmp_path):
    """A real ENOSPC (the temp file is /dev/full): the error is raised, nothing is left behind."""
    dataset = tmp_path / "relevance"
    folder = dataset / "module=encoder" / "layer=0"
    folder.mkdir(parents=True)
    (folder / f".part-b00000-c0000.parquet.tmp-{os.getpid()}").symlink_to(DEV_FULL)
    with pytest.raises(OSError) as exc:
        write_part(dataset, "module=encoder/layer=0/part-b00000-c0000.parquet", SCHEMA.empty_table())
    assert exc.value.errno == errno.ENOSPC or "No space left" in str(exc.value)
    assert list(folder.iterdir()) == []


def _block_output(how: str, dataset: Path, tag: str) -> list[Path]:
    """Make the decoder's part files unwritable, as root too. ``disk_full``: their temp files are links to
    /dev/full (writes fail with ENOSPC); ``blocked``: a regular file where the ``module=decoder`` folder must
    go (a read-only or vanished mount gives the same kind of error). Returns what was planted."""
    if how == "blocked":
        blocker = dataset / "module=decoder"
        blocker.write_text("not a folder")
        return [blocker]
    planted = []
    for layer in (0, 1):
        folder = dataset / "module=decoder" / f"layer={layer}"
        folder.mkdir(parents=True)
        for b in range(3):
            for c in range(2):
                link = folder / f".part-b{b:05d}-c{c:04d}-{tag}.parquet.tmp-{os.getpid()}"
                link.symlink_to(DEV_FULL)
                planted.append(link)
    return planted


@pytest.mark.parametrize("how", ["disk_full", "blocked"])
def test_unwritable_output_mid_sweep_stops_cleanly_and_resumes(sweep_reference, tiny_images, tiny_config,
                                                              tmp_path, how):
    if how == "disk_full" and not DEV_FULL.exists():
        pytest.skip("needs /dev/full")
    out = tmp_path / "out"
    planted: list[Path] = []
    tag = json.loads((sweep_reference[0] / "manifest.json").read_text())["spec_hash"]  # the same request

    def on_event(kind, **info):
        if kind == "item_done" and not planted:  # after the first item: encoder parts only so far
            planted.extend(_block_output(how, out / "relevance", tag))

    lines: list[str] = []
    # one actor, one item at a time: items run in plan order (batch 1: encoder layers, then decoder)
    spec = tiny_spec(out, tiny_images, tiny_config, actors=1, max_in_flight=1)
    res = run_sweep(spec, log_fn=lines.append, progress=False, on_event=on_event)
    assert res.exit_code == 4, lines
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "output_error" and m["error"] == res.manifest["error"]
    reason = "No space left on device" if how == "disk_full" else "Not a directory"
    assert reason in m["error"] and "run the same command again to resume" in m["error"]
    assert any(line.startswith("sweep stopped: cannot write") for line in lines)
    written = _parts(out)
    assert 1 <= len(written) < 24 and all("module=encoder" in str(p) for p in written)
    for p in written:  # complete files only
        assert pq.read_table(p).num_rows == 2 * 3
    assert not (out / "summary.csv").exists()
    if how == "disk_full":  # the failed write removed its temp file; the other links are untouched
        left = _temp_files(out)
        assert len(left) == len(planted) - 1 and set(left) < set(planted)
    # space is back: the same request resumes and ends with the uninterrupted rows
    for p in planted:
        p.unlink(missing_ok=True)
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lines.append, progress=False)
    assert res.exit_code == 0 and res.manifest["counts"]["items_skipped_resume"] == len(written)
    assert_rows_equal(load_rows(out), load_rows(sweep_reference[0]))


# ------------------------------------------------------------------------------ caches over the budget
class _FakeCache:
    def __init__(self, nbytes: int, derived: int) -> None:
        self.nbytes, self.derived_nbytes = nbytes, derived

    def drop_derived(self) -> None:
        self.derived_nbytes = 0


def test_actor_cache_budget_counts_derived_data():
    from collections import OrderedDict

    from lrp_ray.sweep.actor import enforce_cache_budget

    stats: dict = {}
    caches = OrderedDict(a=(_FakeCache(40, 30), {}), b=(_FakeCache(40, 30), {}))  # oldest first
    # 140 bytes > 120: the older cache's derived data goes first (rebuilt on demand), and that is enough
    assert enforce_cache_budget(caches, 120, stats) == 110 and list(caches) == ["a", "b"]
    assert caches["a"][0].derived_nbytes == 0 and caches["b"][0].derived_nbytes == 30
    caches["c"] = (_FakeCache(60, 0), {})  # 40 + 70 + 60: b's maps go, then the oldest cache
    assert enforce_cache_budget(caches, 120, stats) == 100 and list(caches) == ["b", "c"]
    assert stats["derived_drops"] == 2 and stats["evictions"] == 1
    caches["d"] = (_FakeCache(40, 200), {})  # the batch in work keeps its maps, alone over the budget
    assert enforce_cache_budget(caches, 120, stats) == 240 and list(caches) == ["d"]
    assert caches["d"][0].derived_nbytes == 200
    assert stats["evictions"] == 3 and stats["max_caches"] == 2 and stats["max_derived_bytes"] == 200
    assert stats["max_cache_bytes"] == 240


def test_cache_budget_smaller_than_one_batch_completes_with_one_cache_per_actor(ray_session, tiny_config,
                                                                               tmp_path):
    images = write_images(tmp_path / "images", {f"img{i}.png": (320, 480) for i in range(4)})
    kw = dict(overrides=["INPUT.MIN_SIZE_TEST=320", "INPUT.MAX_SIZE_TEST=480"], module="encoder",
              features="0-31", feature_chunk=16, batch_size=2, actors=2)
    runs = {}
    for name, budget in (("roomy", 2048), ("tight", 1)):
        out = tmp_path / name
        res = run_sweep(tiny_spec(out, images, tiny_config, cache_budget_mb=budget, **kw),
                        log_fn=lambda s: None, progress=False)
        assert res.exit_code == 0
        runs[name] = (out, res.manifest, [a["stats"] for a in res.manifest["run"]["actors_info"]])
    assert_rows_equal(load_rows(runs["tight"][0]), load_rows(runs["roomy"][0]))
    roomy, tight = runs["roomy"][2], runs["tight"][2]
    # the engine's per-token maps (16 targets per call >= hidden_dim/2) count towards an actor's caches
    assert all(s["max_derived_bytes"] > 0 for s in roomy + tight)
    for s in tight:  # one cache at a time (the batch in work, with its maps): memory stays flat
        assert s["max_caches"] == 1
        assert s["max_cache_bytes"] > 2 << 20  # one batch's cache alone exceeds the actor's LRU (2 x 1 MiB)
    assert runs["tight"][1]["forward_passes"] == 2  # no batch had to be recomputed


# ------------------------------------------------------------------------------ soak
def _sample(proc_pid: int, out: Path, stop: threading.Event, samples: list, listening: set) -> None:
    import psutil

    root = psutil.Process(proc_pid)
    while not stop.is_set():
        try:
            kids = root.children(recursive=True)
            actors = [k for k in kids if "LrpWorker" in " ".join(k.cmdline())]
            done = len(_parts(out)) if (out / "relevance").is_dir() else 0
            samples.append((done, root.memory_info().rss, max((a.memory_info().rss for a in actors),
                                                              default=0)))
            for k in (root, *kids):
                conns = getattr(k, "net_connections", None) or k.connections  # psutil < 6
                for c in conns(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listening.add((k.name(), c.laddr.ip, c.laddr.port))
        except (psutil.Error, OSError):
            pass
        stop.wait(0.25)


@pytest.mark.slow
def test_soak_memory_stays_flat_and_ray_listens_on_loopback(tiny_config, tmp_path):
    """1000 images, one work item each (1000 forwards, parts and writes): RSS of the driver and of the actor
    sampled throughout must not grow; every socket the CLI's local Ray listens on is a loopback one."""
    from PIL import Image

    n = 1000
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(images / f"img_{i:04d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lrp_ray.sweep", "--images", str(images), "--config", str(tiny_config),
           "--module", "encoder", "--layers", "1", "--features", "0,1", "--batch-size", "1", "--actors", "1",
           "--address", "local", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    samples: list[tuple[int, int, int]] = []
    listening: set = set()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(proc.pid, out, stop, samples, listening), daemon=True)
    sampler.start()
    try:
        log, _ = proc.communicate(timeout=170)
    finally:
        stop.set()
        sampler.join(timeout=10)
        _kill_group(proc.pid)
    assert proc.returncode == 0, log[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["maps_run"] == 2 * n and m["forward_passes"] == n
    assert m["run"]["nodes"] == ["127.0.0.1"]
    during = [s for s in samples if 0 < s[0] < n and s[2] > 0]
    assert len(during) >= 10, f"only {len(during)} samples during the sweep"
    early = [s for s in during if s[0] < n // 2]
    late = [s for s in during if s[0] >= 3 * n // 4]
    assert early and late, during
    mib = 1 << 20
    for col, what in ((1, "driver"), (2, "actor")):
        base = float(np.median([s[col] for s in early]))
        peak = max(s[col] for s in late)
        assert peak - base < 24 * mib, f"{what} RSS grew {(peak - base) / mib:.1f} MiB during the sweep"
    assert listening, "no listening sockets seen"
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    exposed = sorted(x for x in listening if x[1] not in loopback)
    assert not exposed, f"listening beyond loopback: {exposed}"
