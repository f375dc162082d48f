"""Peak memory of a sweep against the number of images: 50 vs 500 images should be flat (within 10%).

Runs the same sweep through the CLI (``python -m lrp_ray.sweep``: the small demo model unless ``--config``
is given, synthetic images, a few features of every layer, fixed actors) over N images for each N, and
records

- ``driver_rss``: the driver's peak RSS (the manifest's ``ru_maxrss``, and sampled);
- ``actor_rss``: the largest actor peak RSS (manifest);
- ``ray_tree_rss``: the sampled peak of the summed RSS of the CLI process and all its descendants (Ray's
  GCS, raylet, workers; shared memory counted once per process that maps it);
- ``object_store``: the sampled peak of the object store's used bytes (the raylet's store stats,
  polled through the GCS address the benchmark gives the CLI's Ray instance).

A metric is flat when largest-N / smallest-N <= 1 + ``--tolerance`` (default 0.10).
Results: ``benchmarks/results/<name>.json`` and ``.md`` (default name ``memory_scaling``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.sweep_cpu import run_cli, run_summary  # noqa: E402

METRICS = ("driver_rss", "actor_rss", "ray_tree_rss", "object_store")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sampler:
    """Polls RSS of a process tree, and (in a second thread) the object store of the Ray instance whose GCS
    listens on ``gcs_address``."""

    def __init__(self, gcs_address: str, interval: float = 0.25) -> None:
        self.gcs_address = gcs_address
        self.interval = interval
        self.peaks: dict[str, int] = {"driver_rss": 0, "ray_tree_rss": 0, "object_store": 0,
                                      "actor_rss": 0, "raylet_rss": 0}
        self.samples = 0
        self.store_samples = 0
        self.store_error: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._state: Any = None

    def start(self, proc: subprocess.Popen) -> None:
        self._threads = [threading.Thread(target=self._rss_loop, args=(proc.pid,), daemon=True),
                         threading.Thread(target=self._store_loop, daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _store_bytes(self) -> int | None:
        try:
            from ray._private.internal_api import get_memory_info_reply
            from ray._private.state import GlobalState
            from ray._raylet import GcsClientOptions

            if self._state is None:  # as ray's get_state_from_address, without rewriting 127.0.0.1
                try:  # the CLI's local Ray uses token auth by default (~/.ray/auth_token): do the same
                    from ray._private.authentication.authentication_token_setup import (
                        maybe_enable_token_auth_if_token_available,
                    )

                    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
                except ImportError:
                    pass
                options = GcsClientOptions.create(self.gcs_address, None, allow_cluster_id_nil=True,
                                                  fetch_cluster_id_if_nil=False)
                state = GlobalState()
                state._initialize_global_state(options)
                self._state = state
            reply = get_memory_info_reply(self._state, timeout_seconds=5)
            self.store_samples += 1
            return int(reply.store_stats.object_store_bytes_used)
        except Exception as exc:  # Ray not up yet, or already gone
            self.store_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            self._state = None
            return None

    def _store_loop(self) -> None:
        while not self._stop.is_set():
            b = self._store_bytes()
            if b is not None:
                self.peaks["object_store"] = max(self.peaks["object_store"], b)
            self._stop.wait(self.interval)

    def _rss_loop(self, pid: int) -> None:
        import psutil

        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    cmd = " ".join(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                if p.pid == pid:
                    self.peaks["driver_rss"] = max(self.peaks["driver_rss"], rss)
                elif "LrpWorker" in cmd:
                    self.peaks["actor_rss"] = max(self.peaks["actor_rss"], rss)
                elif "raylet" in cmd:
                    self.peaks["raylet_rss"] = max(self.peaks["raylet_rss"], rss)
            self.peaks["ray_tree_rss"] = max(self.peaks["ray_tree_rss"], total)
            self.samples += 1
            self._stop.wait(self.interval)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="50,500", help="image counts, comma separated (default 50,500)")
    ap.add_argument("--config", default=None, help="detectron2 config of the model (default: the demo model)")
    ap.add_argument("--module", default="both")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--features", default="0-7", help="features per layer (default 0-7)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--cpus-per-actor", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.1, help="sampling interval, seconds")
    ap.add_argument("--tolerance", type=float, default=0.10, help="flat when largest/smallest <= 1 + this")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per CLI run")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep images and outputs under DIR (default: a temp folder, deleted)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (6 vs 24 images, features 0-1)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the CLI's log")
    ap.add_argument("--name", default=None,
                    help="result file name (default memory_scaling, or memory_scaling_smoke with --smoke)")
    args = ap.parse_args(argv)
    from benchmarks.common import machine, write
    from lrp_ray.sweep.images import write_synthetic_images

    if args.smoke:
        args.images = "6,24" if args.images == "50,500" else args.images
        args.features = "0-1" if args.features == "0-7" else args.features
    name = args.name or ("memory_scaling_smoke" if args.smoke else "memory_scaling")
    counts = sorted({int(x) for x in args.images.split(",") if x.strip()})
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lrp_memscale_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in counts:
            folder = write_synthetic_images(work / f"images_{n}", n)
            out = work / f"out_{n}"
            if out.exists():
                shutil.rmtree(out)
            port = free_port()
            cli = ["--images", str(folder), "--module", args.module, "--layers", args.layers,
                   "--features", args.features, "--batch-size", str(args.batch_size), "--actors",
                   str(args.actors), "--cpus-per-actor", str(args.cpus_per_actor), "--device", "cpu",
                   "--address", "local"]
            if args.config:
                cli += ["--config", args.config]
            sampler = Sampler(f"127.0.0.1:{port}", args.interval)
            print(f"== {n} images: python -m lrp_ray.sweep {' '.join(cli)} --out {out} "
                  f"(RAY_GCS_SERVER_PORT={port})", flush=True)
            t = time.perf_counter()
            try:
                run = run_cli(cli, out, timeout=args.timeout, env={"RAY_GCS_SERVER_PORT": str(port)},
                              on_start=sampler.start, echo=not args.quiet)
            finally:
                sampler.stop()
            s = run_summary(run)
            actors = [v for v in (s["peak_rss"]["actors"] or {}).values() if v]
            manifest_driver = s["peak_rss"]["driver"]
            row = {
                "images": n, "rc": run.rc, "status": s["status"], "wall_s": time.perf_counter() - t,
                "maps": s["maps"], "batches": ((s.get("counts") or {}).get("batches")),
                "driver_rss": max(manifest_driver or 0, sampler.peaks["driver_rss"]) or None,
                "driver_rss_manifest": manifest_driver, "driver_rss_sampled": sampler.peaks["driver_rss"],
                "actor_rss": max(actors) if actors else (sampler.peaks["actor_rss"] or None),
                "actor_rss_sampled": sampler.peaks["actor_rss"],
                "raylet_rss_sampled": sampler.peaks["raylet_rss"],
                "ray_tree_rss": sampler.peaks["ray_tree_rss"] or None,
                "object_store": sampler.peaks["object_store"] if sampler.store_samples else None,
                "object_store_samples": sampler.store_samples, "object_store_error": sampler.store_error,
                "samples": sampler.samples, "summary": s,
            }
            rows.append(row)
            print(f"   rc {run.rc}: driver {_mb(row['driver_rss'])} MB, actor {_mb(row['actor_rss'])} MB, "
                  f"tree {_mb(row['ray_tree_rss'])} MB, object store {_mb(row['object_store'])} MB",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lo, hi = rows[0], rows[-1]
    verdict = {}
    for m in METRICS:
        a, b = lo.get(m), hi.get(m)
        ratio = (b / a) if a and b else None
        verdict[m] = {"small": a, "large": b, "ratio": ratio,
                      "flat": None if ratio is None else bool(ratio <= 1 + args.tolerance)}
    info = machine()
    cmd = "python benchmarks/memory_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["### Memory vs number of images (sweep through the CLI)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}  ",
             f"Command: `{cmd.strip()}`  ",
             f"Model: {args.config or 'the demo model'}; module {args.module}, layers {args.layers}, "
             f"features {args.features}, batch {args.batch_size}, {args.actors} actor(s). "
             "MB = 10^6 bytes.", "",
             "| images | rc | maps | wall s | driver RSS MB | actor RSS MB | Ray tree RSS MB "
             "| object store MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['rc']} | {r['maps']} | {r['wall_s']:.1f} "
                     f"| {_mb(r['driver_rss'])} | {_mb(r['actor_rss'])} | {_mb(r['ray_tree_rss'])} "
                     f"| {_mb(r['object_store'])} |")
    lines += ["", f"{hi['images']} vs {lo['images']} images (flat: ratio <= {1 + args.tolerance:.2f}):", "",
              "| metric | ratio | flat |", "|---|---|---|"]
    for m, v in verdict.items():
        flat = "n/a" if v["flat"] is None else ("yes" if v["flat"] else "**NO**")
        ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.3f}"
        lines.append(f"| {m} | {ratio} | {flat} |")
    write(name, {"machine": info, "command": cmd, "rows": rows, "verdict": verdict,
                 "tolerance": args.tolerance}, "\n".join(lines) + "\n")
    return {"rows": rows, "verdict": verdict}


def _mb(v: float | None) -> str:
    return "n/a" if not v else f"{v / 1e6:.0f}"


if __name__ == "__main__":
    main()
