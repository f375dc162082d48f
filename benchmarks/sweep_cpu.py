"""End-to-end sweeps through the CLI (``python -m lrp_ray.sweep``) on this machine's CPUs.

Cases (each with 1 and with 2 actors, every actor given cores/actors torch threads):

- ``demo``: the quick demo job (``jobs/quick_demo.yaml``: bundled demo model and images, or the random
  stand-in and synthetic images), features 0-15 of every encoder and decoder layer;
- ``encoder``: DETR-R50 shape (random weights, ``--config`` only), 8 images 480x640, all 6 encoder layers
  x 256 features.

For every run: wall time of the CLI process, maps per second, and the time split into Ray start, model load,
image decode, forward, propagation, writing. The split comes from the sweep's ``manifest.json`` timings
where the manifest has them; otherwise it is derived from the CLI's log lines (timestamped as they
arrive) and each number says where it came from (``manifest``, ``log`` or ``missing``).

Results: ``benchmarks/results/<name>.json`` and ``.md`` (default name ``sweep_cpu``).

The helpers here (:func:`run_cli`, :func:`parse_log`, :func:`timing_split`) also serve
``benchmarks/memory_scaling.py`` and ``benchmarks/gpu/run_all.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# ------------------------------------------------------------------------------------------ running the CLI

_WRAPPER = """\
import os, sys, time
t0 = time.perf_counter()
import ray
ray.init(address="local", num_gpus=int(os.environ["LRP_BENCH_NUM_GPUS"]), include_dashboard=False,
         _node_ip_address="127.0.0.1", log_to_driver=True)
print(f"bench: ray.init {time.perf_counter() - t0:.3f}s", flush=True)
from lrp_ray.sweep.cli import main
code = main(sys.argv[1:])
ray.shutdown()
sys.exit(code)
"""
"""Runs the CLI's ``main`` after a ``ray.init`` that declares the GPUs (for machines where Ray does not
detect them itself; the sweep then uses the existing Ray connection)."""


@dataclass
class CliRun:
    argv: list[str]
    out: Path
    rc: int | None = None
    wall_s: float = 0.0
    timed_out: bool = False
    lines: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the process started, line) of stdout and stderr, merged."""
    manifest: dict | None = None

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a CLI subprocess: this checkout importable (also by Ray workers), no usage stats."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH", "")
    if str(REPO) not in pp.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(cli_args: Sequence[str], out: Path, *, timeout: float | None = None,
            env: dict[str, str] | None = None, num_gpus: int | None = None, echo: bool | str = True,
            on_start: Callable[[subprocess.Popen], None] | None = None, prefix: str = "  | ",
            grace: float = 30.0) -> CliRun:
    """Run ``python -m lrp_ray.sweep <cli_args> --out OUT`` and collect its log and manifest (its output is a
    pipe, so the CLI reports progress as a log line every 10 s instead of a bar).

    ``num_gpus``: start Ray in a wrapper with that many GPUs declared, then the CLI's ``main``.
    ``echo``: print the CLI's lines (``"brief"``: all but the per-work-item lines).
    ``timeout``: seconds; then the CLI gets SIGINT (it stops its actors, writes an ``interrupted``
    manifest and exits 130; finished work stays in OUT), and SIGKILL for its process group 30 s later;
    a sweep whose work is all done by then (summary and manifest being written) gets ``grace`` s more first.
    """
    args = [*map(str, cli_args), "--out", str(out)]
    if num_gpus is None:
        argv = [sys.executable, "-m", "lrp_ray.sweep", *args]
    else:
        argv = [sys.executable, "-c", _WRAPPER, *args]
        env = {**(env or {}), "LRP_BENCH_NUM_GPUS": str(int(num_gpus))}
    run = CliRun(argv=argv, out=Path(out))
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=str(REPO), env=bench_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    if on_start is not None:
        on_start(proc)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            run.lines.append((time.perf_counter() - t0, line))
            if echo and not (echo == "brief" and _ITEM.match(line)):
                print(prefix + line, flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if _finishing(run.lines):
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    if proc.poll() is None:
        run.timed_out = True
        print(f"{prefix}(time limit {timeout:.0f}s reached: interrupting the sweep)", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
    run.wall_s = time.perf_counter() - t0
    run.rc = proc.returncode
    th.join(timeout=10)
    _kill_group(proc.pid)  # anything of ours left in the CLI's process group (Ray processes)
    from lrp_ray.results import read_manifest

    manifest = read_manifest(out)
    run.manifest = None if manifest is None else manifest.model_dump(mode="json")
    return run


def _finishing(lines: Sequence[tuple[float, str]]) -> bool:
    """All work items done: only the summary and the manifest are left to write."""
    for _, line in reversed(lines[-5:]):
        if line.startswith("status ") or (line.startswith("progress:") and "(100.0%)" in line):
            return True
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------ reading a run

_READY = re.compile(r"^(?P<desc>.+): (?P<actors>\d+) actor\(s\) on (?P<device>\S+), "
                    r"(?P<items>\d+) work items, (?P<batches>\d+) image batches")
_ITEM = re.compile(r"^(?P<module>encoder|decoder) layer (?P<layer>\d+), features (?P<features>\S+), "
                   r"batch (?P<batch>\d+)/(?P<batches>\d+) \((?P<images>\d+) images?\) (?P<s>[\d.]+)s "
                   r"\[(?P<source>\w+), actor (?P<actor>\d+)\]")
_RAY_INIT = re.compile(r"^bench: ray\.init (?P<s>[\d.]+)s")


def _count_features(text: str) -> int:
    n = 0
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            n += int(b) - int(a) + 1
        elif part:
            n += 1
    return n


def parse_log(lines: Sequence[tuple[float, str]]) -> dict[str, Any]:
    """Timestamps and per-item records from the CLI's log lines (see ``driver.execute``)."""
    info: dict[str, Any] = {"items": []}
    for t, line in lines:
        if "t_results" not in info and line.startswith("results: "):
            info["t_results"] = t
        m = _RAY_INIT.match(line)
        if m:
            info["wrapper_ray_init_s"] = float(m.group("s"))
            info["t_wrapper_ray"] = t
        m = _READY.match(line)
        if m and "t_ready" not in info:
            info.update(t_ready=t, run_desc=m.group("desc"), actors=int(m.group("actors")),
                        device=m.group("device"), n_items=int(m.group("items")),
                        n_batches=int(m.group("batches")))
            continue
        m = _ITEM.match(line)
        if m:
            info["items"].append({
                "t": t, "module": m.group("module"), "layer": int(m.group("layer")),
                "features": _count_features(m.group("features")), "images": int(m.group("images")),
                "seconds": float(m.group("s")), "source": m.group("source"), "actor": int(m.group("actor"))})
        if line.startswith("status "):
            info["t_status"] = t
    return info


_TIMING_KEYS = {
    "ray_start": ("ray_start", "ray_init", "connect", "ray"),
    "model_load": ("model_load", "model"),
    "image_decode": ("image_decode", "decode", "read_images", "images"),
    "forward": ("forward", "forwards", "forward_pass"),
    "propagation": ("propagation", "propagate", "relevance"),
    "writing": ("writing", "write", "writer"),
}
"""Manifest timing names looked for (manifest["timings"], then summed actor stats ``<name>_seconds``)."""


def _actor_stat_seconds(manifest: dict, names: Sequence[str]) -> float | None:
    infos = ((manifest.get("run") or {}).get("actors_info")) or []
    total, found = 0.0, False
    for info in infos:
        stats = info.get("stats") or {}
        for n in names:
            for key in (f"{n}_seconds", f"{n}_s", f"seconds_{n}"):
                if isinstance(stats.get(key), (int, float)):
                    total += float(stats[key])
                    found = True
    return total if found else None


def timing_split(run: CliRun) -> dict[str, dict[str, Any]]:
    """Ray start, model load, image decode, forward, propagation, writing (+ total, sweep, summary).

    Each entry: ``{"s": seconds or None, "source": "manifest" | "log" | "missing", "note": ...}``.
    """
    m = run.manifest or {}
    tm = m.get("timings") or {}
    log = parse_log(run.lines)
    items = log["items"]
    split: dict[str, dict[str, Any]] = {}

    def from_manifest(key: str) -> dict[str, Any] | None:
        for name in _TIMING_KEYS[key]:
            v = tm.get(name)
            if isinstance(v, (int, float)):
                note = "driver" if key == "model_load" else ""
                return {"s": float(v), "source": "manifest", "note": f"timings.{name} {note}".strip()}
        v = _actor_stat_seconds(m, _TIMING_KEYS[key])
        if v is not None:
            return {"s": v, "source": "manifest", "note": "actor stats, summed over actors"}
        return None

    # Ray start: connect + cluster resources + the weights into the object store (before any actor)
    ray_start = from_manifest("ray_start")
    if ray_start is None and "wrapper_ray_init_s" in log:
        ray_start = {"s": log["wrapper_ray_init_s"], "source": "log", "note": "ray.init in the GPU wrapper"}
    if ray_start is None and "t_ready" in log:
        prep = tm.get("prepare")
        if isinstance(prep, (int, float)):
            ray_start = {"s": max(0.0, log["t_ready"] - float(prep)), "source": "log",
                         "note": "process start to the 'N actor(s) on' line minus timings.prepare: ray.init, "
                                 "the weights into the object store, plus interpreter start and CLI imports"}
        else:
            ray_start = {"s": log["t_ready"], "source": "log",
                         "note": "process start to the 'N actor(s) on' line (prepare included: no manifest)"}
    split["ray_start"] = ray_start or {"s": None, "source": "missing",
                                       "note": "no Ray start timing in manifest or log"}
    # model load: driver (config + weights, state dict) and each actor's build + load_state_dict
    ml = from_manifest("model_load")
    actor_load = [float((a.get("stats") or {}).get("load_seconds") or 0.0)
                  for a in ((m.get("run") or {}).get("actors_info") or [])]
    if ml is not None:
        if actor_load:
            ml = {**ml, "s": ml["s"] + max(actor_load),
                  "note": ml["note"] + " + slowest actor's stats.load_seconds"}
        split["model_load"] = ml
    else:
        split["model_load"] = {"s": None, "source": "missing", "note": "no model timing in manifest"}
    dec = from_manifest("image_decode")
    if dec is None and isinstance(tm.get("validate_images"), (int, float)):
        dec = {"s": float(tm["validate_images"]), "source": "manifest",
               "note": "timings.validate_images: every image decoded once by the driver (the batch reads "
                       "for the actors and their preprocessing are not timed)"}
    split["image_decode"] = dec or {"s": None, "source": "missing", "note": "no decode timing in manifest"}
    # forward / propagation: from per-item seconds (an item whose cache source is 'forward' ran the
    # forward pass first); forward = forward-item time minus the median local item of the same shape
    fwd = from_manifest("forward")
    prop = from_manifest("propagation")
    if items and (fwd is None or prop is None):
        local: dict[tuple, list[float]] = {}
        for it in items:
            if it["source"] == "local":
                local.setdefault((it["module"], it["layer"], it["features"], it["images"]), []).append(
                    it["seconds"])
        all_local = [s for v in local.values() for s in v]
        fallback = statistics.median(all_local) if all_local else 0.0
        f_est = 0.0
        for it in items:
            if it["source"] == "forward":
                ref = local.get((it["module"], it["layer"], it["features"], it["images"]))
                f_est += max(0.0, it["seconds"] - (statistics.median(ref) if ref else fallback))
        total_items = sum(it["seconds"] for it in items)
        if fwd is None:
            fwd = {"s": f_est, "source": "log",
                   "note": "estimate: forward-source items minus the median cache-hit item of the same shape "
                           "(actor-seconds, summed over actors)"}
        if prop is None:
            prop = {"s": total_items - f_est, "source": "log",
                    "note": "sum of item seconds (incl. result -> Arrow table) minus the forward estimate "
                            "(actor-seconds, summed over actors: can exceed the wall time)"}
    split["forward"] = fwd or {"s": None, "source": "missing", "note": "no item log lines"}
    split["propagation"] = prop or {"s": None, "source": "missing", "note": "no item log lines"}
    split["writing"] = from_manifest("writing") or {
        "s": None, "source": "missing",
        "note": "the driver's Parquet writes are not timed in the manifest (only timings.summary)"}
    for key in ("prepare", "sweep", "summary", "total"):
        if isinstance(tm.get(key), (int, float)):
            split[key] = {"s": float(tm[key]), "source": "manifest", "note": f"timings.{key}"}
    if items and "t_ready" in log:
        first = items[0]
        split["first_item_after_ready"] = {
            "s": first["t"] - log["t_ready"], "source": "log",
            "note": "actors line to the first finished item: actor start + model build + first forward/item"}
    split["process_wall"] = {"s": run.wall_s, "source": "bench", "note": "CLI process, start to exit"}
    return split


def decoder_targets_per_feature(manifest: dict | None) -> int:
    """Selected queries per image and feature of a sweep's decoder targets (from its manifest)."""
    m = manifest or {}
    q = (m.get("selection") or {}).get("queries")
    if isinstance(q, list):
        return len(q)
    if isinstance(q, str) and q.startswith("top"):
        return int(q[3:])
    if q == "all":
        return int(((m.get("model") or {}).get("dims") or {}).get("num_queries") or 1)
    return 1


def maps_done(run: CliRun) -> int:
    """Maps computed in this run (manifest, else summed from the item log lines)."""
    c = (run.manifest or {}).get("counts") or {}
    if isinstance(c.get("maps_run"), int) and (run.manifest or {}).get("status") != "running":
        return int(c["maps_run"])
    r = decoder_targets_per_feature(run.manifest)
    return sum(it["images"] * it["features"] * (r if it["module"] == "decoder" else 1)
               for it in parse_log(run.lines)["items"])


def run_summary(run: CliRun) -> dict[str, Any]:
    """JSON-able facts of one CLI run."""
    m = run.manifest or {}
    log = parse_log(run.lines)
    split = timing_split(run)
    maps = maps_done(run)
    sweep_s = (split.get("sweep") or {}).get("s")
    peak = m.get("peak_memory") or {}
    actors = peak.get("actors") or {}
    # steady state: maps of the items after the first one, over the time from the first to the last item
    r = decoder_targets_per_feature(m)
    items = log["items"]
    steady = None
    if len(items) >= 3 and items[-1]["t"] > items[0]["t"]:
        n = sum(it["images"] * it["features"] * (r if it["module"] == "decoder" else 1) for it in items[1:])
        steady = n / (items[-1]["t"] - items[0]["t"])
    return {
        "argv": run.argv[1:], "rc": run.rc,
        "status": m.get("status"), "timed_out": run.timed_out, "wall_s": run.wall_s,
        "actors": log.get("actors"), "device": log.get("device"), "n_items": log.get("n_items"),
        "items_logged": len(log["items"]), "maps": maps,
        "maps_total": (m.get("counts") or {}).get("maps_total"),
        "maps_per_s_wall": maps / run.wall_s if run.wall_s else None,
        "maps_per_s_sweep": maps / sweep_s if sweep_s else None,
        "maps_per_s_steady": steady,
        "t_first_item_s": items[0]["t"] if items else None,
        "counts": m.get("counts"), "forward_passes": m.get("forward_passes"), "cache": m.get("cache"),
        "timings_manifest": m.get("timings"), "split": split,
        "peak_rss": {"driver": peak.get("driver_rss"),
                     "actors": {k: v.get("peak_rss") for k, v in actors.items()},
                     "actors_device": {k: v.get("peak_device") for k, v in actors.items()}},
        "log_tail": [line for _, line in run.lines[-15:]],
    }


SPLIT_COLUMNS = ("ray_start", "model_load", "image_decode", "forward", "propagation", "writing")


def split_cells(split: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown cells for :data:`SPLIT_COLUMNS`; log-derived values marked ~, missing ones n/a."""
    cells = []
    for key in SPLIT_COLUMNS:
        e = split.get(key) or {}
        if e.get("s") is None:
            cells.append("n/a")
        else:
            cells.append(("~" if e.get("source") == "log" else "") + f"{e['s']:.2f}")
    return cells


# ------------------------------------------------------------------------------------------ the benchmark

TINY: dict[str, object] = {
    "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STEM_OUT_CHANNELS": 8, "MODEL.RESNETS.RES2_OUT_CHANNELS": 8,
    "MODEL.DETR.HIDDEN_DIM": 32, "MODEL.DETR.NHEADS": 4, "MODEL.DETR.DIM_FEEDFORWARD": 64,
    "MODEL.DETR.ENC_LAYERS": 2, "MODEL.DETR.DEC_LAYERS": 2, "MODEL.DETR.NUM_OBJECT_QUERIES": 5,
    "MODEL.DETR.NUM_CLASSES": 3, "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 128,
}
"""A tiny DETR for smoke runs: ResNet-18 (8 channels), hidden 32, 2+2 layers, 5 queries, 64 px images."""


def _r50_config(path: Path, min_size: int, max_size: int, tiny: bool = False) -> Path:
    from lrp_ray.models import DetrConfig

    if tiny:
        cfg = DetrConfig().with_overrides(TINY)
    else:
        cfg = DetrConfig().with_overrides({"INPUT.MIN_SIZE_TEST": min_size, "INPUT.MAX_SIZE_TEST": max_size})
    cfg.to_yaml(path)
    return path


def _write_images(folder: Path, n: int, h: int, w: int, seed: int = 0) -> Path:
    from PIL import Image

    from benchmarks.common import images

    folder.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(images(n, h, w, seed)):
        Image.fromarray(arr).save(folder / f"img_{i:03d}.jpg", quality=92)
    return folder


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="demo,encoder", help="comma separated: demo, encoder (default both)")
    ap.add_argument("--actors", default="1,2", help="actor counts to compare (default 1,2)")
    ap.add_argument("--cores", type=int, default=0,
                    help="CPU cores to share among the actors (default: all of this machine's)")
    ap.add_argument("--demo-spec", default="jobs/quick_demo.yaml", help="job file of the demo case")
    ap.add_argument("--images", type=int, default=8, help="images of the encoder case (default 8)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--features", default="all", help="features of the encoder case (default all = 256)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per CLI run (default 3600)")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep the sweeps' outputs under DIR (default: a temp folder, deleted)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (demo features 0-3; a tiny DETR on 2 images 64x96) to test the script")
    ap.add_argument("--quiet", action="store_true", help="do not echo the CLI's log")
    ap.add_argument("--name", default=None, help="result file name under benchmarks/results "
                                                 "(default sweep_cpu, or sweep_cpu_smoke with --smoke)")
    args = ap.parse_args(argv)
    from benchmarks.common import machine, write

    name = args.name or ("sweep_cpu_smoke" if args.smoke else "sweep_cpu")
    cores = args.cores or os.cpu_count() or 1
    actor_counts = [int(a) for a in args.actors.split(",") if a.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lrp_sweep_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for case in cases:
            if case == "demo":
                base = ["--spec", str(REPO / args.demo_spec)]
                if args.smoke:
                    base += ["--features", "0-3"]
                what = f"{args.demo_spec}" + (" features 0-3" if args.smoke else "")
            elif case == "encoder":
                imgs = _write_images(work / "images_encoder", 2 if args.smoke else args.images,
                                     64 if args.smoke else args.height, 96 if args.smoke else args.width)
                cfg = _r50_config(work / "config.yaml", min(args.height, args.width),
                                  max(args.height, args.width), tiny=args.smoke)
                base = ["--config", str(cfg), "--images", str(imgs), "--module", "encoder", "--layers", "all",
                        "--features", args.features, "--batch-size", str(args.batch_size)]
                n_img = len(list(imgs.iterdir()))
                what = (f"{'tiny DETR' if args.smoke else 'DETR-R50 shape (random weights)'}, {n_img} images "
                        f"{'64x96' if args.smoke else f'{args.height}x{args.width}'}, encoder all layers, "
                        f"features {args.features}")
            else:
                raise SystemExit(f"unknown case {case!r} (demo, encoder)")
            for n in actor_counts:
                out = work / f"{case}_{n}actors"
                if out.exists():
                    shutil.rmtree(out)
                cpa = max(1, cores // n)
                cli = [*base, "--actors", str(n), "--cpus-per-actor", str(cpa), "--device", "cpu",
                       "--address", "local"]
                print(f"== {case}, {n} actor(s) x {cpa} thread(s): python -m lrp_ray.sweep "
                      f"{' '.join(cli)} --out {out}", flush=True)
                run = run_cli(cli, out, timeout=args.timeout, echo=not args.quiet)
                row = {"case": case, "what": what, "actors": n, "threads_per_actor": cpa, **run_summary(run)}
                rows.append(row)
                print(f"   rc {run.rc}, {row['maps']} maps in {run.wall_s:.1f}s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    info = machine()
    cmd = "python benchmarks/sweep_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["### Sweep end to end through the CLI (CPU)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}  ",
             f"Command: `{cmd.strip()}`  ",
             "maps/s: sweep = maps / manifest timings.sweep (actor start-up included); steady = first to "
             "last finished work item; wall = the CLI process, start to exit.  ",
             "Split: seconds; `~` = derived from the CLI's log lines, n/a = not in the manifest (see JSON "
             "`split` notes); forward and propagation are actor-seconds (summed over actors).", "",
             "| case | actors x threads | rc | maps | wall s | sweep s | maps/s sweep | maps/s steady "
             "| maps/s wall | Ray start | model load | image decode | forward | propagation | writing "
             "| peak RSS GB driver/actor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sweep = (r["split"].get("sweep") or {}).get("s")
        actors_rss = [v for v in (r["peak_rss"]["actors"] or {}).values() if v]
        drv = r["peak_rss"]["driver"]
        lines.append(
            f"| {r['case']} | {r['actors']} x {r['threads_per_actor']} | {r['rc']} | {r['maps']} "
            f"| {r['wall_s']:.1f} | {'n/a' if sweep is None else f'{sweep:.1f}'} "
            f"| {_fmt(r['maps_per_s_sweep'])} | {_fmt(r['maps_per_s_steady'])} "
            f"| {_fmt(r['maps_per_s_wall'])} | "
            + " | ".join(split_cells(r["split"]))
            + f" | {_gb(drv)}/{_gb(max(actors_rss) if actors_rss else None)} |")
    lines += ["", "Cases: " + "; ".join(sorted({f"{r['case']}: {r['what']}" for r in rows}))]
    missing = sorted({k for r in rows for k in SPLIT_COLUMNS
                      if (r["split"].get(k) or {}).get("source") != "manifest"})
    if missing:
        lines.append(f"Not in the manifest (derived from the log or n/a): {', '.join(missing)}.")
    write(name, {"machine": info, "command": cmd, "rows": rows}, "\n".join(lines) + "\n")
    return {"rows": rows}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _gb(v: float | None) -> str:
    return "n/a" if not v else f"{v / 1e9:.2f}"


if __name__ == "__main__":
    main()
