"""Robustness round 2: one owner per output folder, completion proven from disk, foreign parts never
counted, SIGTERM like Ctrl-C, requests a local Ray instance can never meet."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lrp_ray.results import load, part_files
from lrp_ray.sweep import prepare, run_sweep
from lrp_ray.sweep.lock import LOCK_NAME

from .conftest import REPO, load_rows, run_cli, tiny_spec
from .test_reliability_faults import _kill_group, _wait_for_parts


def _cli_args(images, config, out, *extra):
    return ["--images", str(images), "--config", str(config), "--out", str(out), "--features", "0-3",
            "--address", "local", "--device", "cpu", "--actors", "1", "--no-progress", *extra]


def test_a_second_sweep_or_overwrite_into_a_held_folder_is_refused_naming_the_holder(
        ray_session, tiny_images, tiny_config, tmp_path):
    out = tmp_path / "out"
    prep = prepare(tiny_spec(out, tiny_images, tiny_config), log_fn=lambda s: None)  # holds OUT
    try:
        assert (out / LOCK_NAME).is_file()
        for extra in ([], ["--batch-size", "3"], ["--overwrite"]):
            r = run_cli(_cli_args(tiny_images, tiny_config, out, *extra), timeout=120)
            assert r.returncode == 2, r.stdout + r.stderr
            lines = [x for x in r.stderr.splitlines() if x.strip()]
            assert len(lines) == 1 and "in use by another sweep" in lines[0], r.stderr
            assert f"pid {__import__('os').getpid()}" in lines[0]
            assert "Traceback" not in r.stderr
        assert not (out / "relevance").exists() and not (out / "manifest.json").exists()
    finally:
        prep.release()
    # released: the same folder is usable, and the lock file alone does not make it "not empty"
    r = run_cli(_cli_args(tiny_images, tiny_config, out), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_complete_is_declared_only_when_every_planned_part_is_on_disk(ray_session, tiny_images, tiny_config,
                                                                       tmp_path):
    out = tmp_path / "out"
    removed: list[str] = []

    def remove_a_written_part(kind, **info):
        if kind == "item_done" and info["done"] == 3 and not removed:
            victim = part_files(out)[0]
            removed.append(victim.name)
            victim.unlink()

    lines: list[str] = []
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config, actors=1), log_fn=lines.append, progress=False,
                    on_event=remove_a_written_part)
    assert removed
    assert res.exit_code == 3 and res.manifest["status"] == "incomplete"
    assert res.manifest["counts"]["items_missing"] == 1
    assert any("sweep incomplete: 1 planned part" in x for x in lines)
    again = run_sweep(tiny_spec(out, tiny_images, tiny_config, actors=1), log_fn=lambda s: None,
                      progress=False)
    assert again.exit_code == 0 and again.manifest["counts"]["items_run"] == 1
    assert again.manifest["counts"]["items_missing"] == 0


def test_parts_of_another_request_are_never_counted(ray_session, sweep_reference, tiny_images, tiny_config,
                                                    tmp_path):
    ref = sweep_reference[0]
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    n_rows = len(load(out))
    foreign = part_files(out)[0]
    stem = foreign.name.rsplit("-", 1)[0]
    shutil.copy(foreign, foreign.with_name(f"{stem}-0123456789abcdef.parquet"))  # another request's part
    assert len(load(out)) == n_rows
    assert len(load_rows(out)) > n_rows  # a plain pandas read of the folder would count it
    (out / "summary.csv").unlink()  # so that the resumed run summarises again
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0 and res.manifest["counts"]["items_run"] == 0  # resumed: nothing to do
    assert res.manifest["counts"]["summary_rows"] == sweep_reference[1].manifest["counts"]["summary_rows"]
    assert (out / "summary.csv").read_text() == (ref / "summary.csv").read_text()


@pytest.mark.slow
def test_sigterm_stops_a_sweep_like_ctrl_c_and_it_resumes(tiny_images, tiny_config, tmp_path):
    out = tmp_path / "out"
    args = _cli_args(tiny_images, tiny_config, out, "--features", "0-15", "--feature-chunk", "1")
    cmd = [sys.executable, "-m", "lrp_ray.sweep", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_parts(proc, out, 3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    for p in part_files(out):
        assert pq.read_metadata(p).num_rows > 0
    again = run_cli(args, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_in_any_phase_exits_130_with_one_line(tiny_images, tiny_config, tmp_path):
    """Imports, model load, Ray start-up, the sweep: the signal lands wherever; never a C++ abort (-6), a
    deep traceback or Ray's own exit code 15."""
    import time

    for delay in (0.4, 1.0, 1.6, 2.4, 3.2):
        out = tmp_path / f"out_{delay}"
        cmd = [sys.executable, "-m", "lrp_ray.sweep", *_cli_args(tiny_images, tiny_config, out)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            _kill_group(proc.pid)
        if proc.returncode == 0:
            continue  # finished before the signal
        assert proc.returncode == 130, (delay, stdout[-2000:] + stderr[-2000:])
        ours = [x for x in stderr.splitlines() if x.strip() and "WARNING" not in x]
        assert "Traceback" not in stderr and len(ours) == 1 and "interrupted" in ours[0], (delay, stderr)


def test_actors_a_local_ray_instance_can_never_start_are_refused_at_once(tiny_images, tiny_config, tmp_path):
    import os

    cpus = os.cpu_count() or 1
    r = run_cli(_cli_args(tiny_images, tiny_config, tmp_path / "out", "--cpus-per-actor", str(cpus + 2)),
                timeout=180)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"--cpus-per-actor {cpus + 2}" in lines[0] and "ask for fewer" in lines[0]


def test_requested_heatmaps_that_fail_show_in_the_exit_code_and_manifest(ray_session, sweep_reference,
                                                                        tiny_images, tiny_config, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sweep_reference[0], out)
    (out / "heatmaps").write_text("a file where the heatmaps folder must go")
    lines: list[str] = []
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config, heatmaps=True), log_fn=lines.append,
                    progress=False)
    assert res.exit_code == 3 and res.manifest["status"] == "incomplete"
    assert res.manifest["heatmaps"]["error"] and res.manifest["heatmaps"]["files"] == 0
    assert any("--heatmaps: rendering failed" in x for x in lines)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    (out / "heatmaps").unlink()
    again = run_sweep(tiny_spec(out, tiny_images, tiny_config, heatmaps=True), log_fn=lambda s: None,
                      progress=False)
    assert again.exit_code == 0 and again.manifest["heatmaps"]["files"] > 0


def test_a_finished_folder_on_read_only_storage_reports_complete(sweep_reference, tiny_images, tiny_config,
                                                                 tmp_path):
    import os
    import stat

    from .conftest import drop_dac_override

    out = tmp_path / "out"
    shutil.copytree(sweep_reference[0], out)
    for p in [out, *out.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        args = ["--images", str(tiny_images), "--config", str(tiny_config), "--out", str(out),
                "--batch-size", "2", "--features", "0-5", "--feature-chunk", "3", "--queries", "top2",
                "--device", "cpu", "--actors", "1", "--no-progress"]
        r = run_cli(args, timeout=180, preexec_fn=drop_dac_override)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "already complete" in r.stdout
    finally:
        for p in [out, *out.rglob("*")]:
            os.chmod(p, p.stat().st_mode | stat.S_IWUSR)


def test_file_names_that_are_not_utf8_are_processed_and_stored_reversibly(ray_session, tiny_config,
                                                                          tmp_path):
    import os

    import numpy as np
    from PIL import Image

    from lrp_ray.api import explain
    from lrp_ray.models import load_model
    from lrp_ray.results import image_path

    from .conftest import write_images

    images = write_images(tmp_path / "images", {"good.png": (64, 80), "mate.png": (70, 64)})
    raw = os.fsencode(images)
    good_bytes, broken_bytes = raw + b"/bad\xff\xfename.png", raw + b"/broken\xfe.png"
    buf = np.random.default_rng(1).integers(0, 255, (66, 77, 3), dtype=np.uint8)
    Image.fromarray(buf).save(good_bytes.decode("utf-8", "surrogateescape"), format="PNG")
    with open(broken_bytes, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    lines: list[str] = []
    res = run_sweep(tiny_spec(out, images, tiny_config, batch_size=3, module="encoder", layers="1"),
                    log_fn=lines.append, progress=False)
    assert res.exit_code == 1, lines  # every good image used; the broken one reported
    df = load(out)
    assert set(df.image) == {"good.png", "mate.png", "bad\\xff\\xfename.png"}
    assert len(df) == 3 * 6
    errors = (out / "errors.csv").read_text(encoding="utf-8")
    assert "broken\\xfe.png" in errors
    # the stored name leads back to the very file
    assert os.fsencode(image_path(images, "bad\\xff\\xfename.png")) == good_bytes
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "complete"
    # the notebook API takes such a file too
    rows = explain(load_model(str(tiny_config), None), good_bytes.decode("utf-8", "surrogateescape"),
                   "encoder", 1, [0], device="cpu")
    assert len(rows) == 1 and rows.image.iloc[0].endswith("bad\\xff\\xfename.png")


def test_an_image_that_vanishes_after_checking_costs_only_itself(ray_session, tiny_config, tmp_path):
    from lrp_ray.sweep import execute

    from .conftest import write_images

    images = write_images(tmp_path / "images", {"a.png": (64, 70), "b.png": (66, 64), "c.png": (64, 64),
                                                "d.png": (70, 70)})
    spec = tiny_spec(tmp_path / "out", images, tiny_config, batch_size=2, module="encoder", layers="0",
                     actors=1)
    prep = prepare(spec, log_fn=lambda s: None)
    (images / "c.png").unlink()  # batch 2 of 2 (c.png, d.png)
    res = execute(prep, log_fn=lambda s: None, progress=False)
    assert res.exit_code == 1 and res.manifest["status"] == "complete" and not res.failed_items
    assert [e.name for e in res.errors] == ["c.png"] and "vanished" in res.errors[0].reason
    assert set(load(tmp_path / "out").image) == {"a.png", "b.png", "d.png"}  # its batch mate d.png too
    assert not (tmp_path / "out" / LOCK_NAME).is_file() or not prep.lock.held  # released


def test_actors_a_cluster_cannot_place_stop_the_sweep_in_bounded_time_naming_the_shortfall(
        ray_session, tiny_images, tiny_config, tmp_path):
    import time

    lines: list[str] = []
    t0 = time.monotonic()
    res = run_sweep(tiny_spec(tmp_path / "out", tiny_images, tiny_config, actors=1, cpus_per_actor=3,
                              start_timeout_s=3), log_fn=lines.append, progress=False)
    assert time.monotonic() - t0 < 120
    assert res.exit_code == 3 and res.manifest["status"] == "incomplete"
    stop = [x for x in lines if x.startswith("sweep stopped: no actor started within 3s")]
    assert stop and "each actor asks for 3 CPU(s); the cluster has 2 CPU(s)" in stop[0], lines


def test_a_short_or_corrupt_part_is_computed_again(ray_session, sweep_reference, tiny_images, tiny_config,
                                                   tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sweep_reference[0], out)
    victim = part_files(out)[3]
    victim.write_bytes(b"")  # e.g. a power loss before the data reached the disk
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0 and res.manifest["counts"]["items_run"] == 1
    assert pq.read_metadata(victim).num_rows > 0
    from .conftest import assert_rows_equal

    assert_rows_equal(load_rows(out), load_rows(sweep_reference[0]))


def test_an_image_whose_content_changed_after_checking_is_not_used(ray_session, tiny_config, tmp_path):
    import numpy as np
    from PIL import Image

    from lrp_ray.sweep import execute

    from .conftest import write_images

    images = write_images(tmp_path / "images", {"a.png": (64, 70), "b.png": (66, 64)})
    prep = prepare(tiny_spec(tmp_path / "out", images, tiny_config, batch_size=1, module="encoder",
                             layers="0", actors=1), log_fn=lambda s: None)
    Image.fromarray(np.zeros((66, 64, 3), np.uint8)).save(images / "b.png")  # same name, other pixels
    res = execute(prep, log_fn=lambda s: None, progress=False)
    assert res.exit_code == 1 and not res.failed_items
    assert [e.name for e in res.errors] == ["b.png"] and "content changed" in res.errors[0].reason
    assert set(load(tmp_path / "out").image) == {"a.png"}


def test_already_complete_is_not_claimed_when_heatmaps_or_errors_changed(ray_session, sweep_reference,
                                                                         tiny_images, tiny_config, tmp_path):
    out, imgs = tmp_path / "out", tmp_path / "images"
    shutil.copytree(tiny_images, imgs)
    spec = tiny_spec(out, imgs, tiny_config, heatmaps=True)
    assert run_sweep(spec, log_fn=lambda s: None, progress=False).exit_code == 0
    shutil.rmtree(out / "heatmaps")
    lines: list[str] = []
    res = run_sweep(spec, log_fn=lines.append, progress=False)
    assert res.exit_code == 0 and not any(x.startswith("already complete") for x in lines)
    assert len(list((out / "heatmaps").glob("*.png"))) == res.manifest["heatmaps"]["files"] > 0
    (imgs / "zz_broken.png").write_bytes(b"not an image")  # a new unusable file: errors.csv must say so
    res = run_sweep(spec, log_fn=lambda s: None, progress=False)
    assert res.exit_code == 1 and "zz_broken.png" in (out / "errors.csv").read_text()


def test_paths_that_are_not_utf8_reach_ray(tiny_config, tmp_path):
    import os

    from .conftest import write_images

    folder = os.fsencode(tmp_path) + b"/imgs\xff"
    write_images(Path(os.fsdecode(folder)), {"a.png": (64, 64)})
    r = run_cli(_cli_args(os.fsdecode(folder), tiny_config, tmp_path / "out", "--features", "0"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
