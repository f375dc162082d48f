"""Reaching Ray: start a private local instance or join a cluster, and size the actor fleet to it."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import interrupts
from .errors import BadRequest
from .spec import RunSpec

__all__ = ["connect", "bind_local_to_loopback", "actor_plan"]

log = logging.getLogger("lrp_ray.sweep")

_LOCAL_ENV_DONE = False


def _prepare_local_env() -> None:
    """Local mode: let Ray's workers import this package (also when it is not pip-installed)."""
    global _LOCAL_ENV_DONE
    if _LOCAL_ENV_DONE:
        return
    _LOCAL_ENV_DONE = True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = str(Path(__file__).resolve().parents[2])
    pp = os.environ.get("PYTHONPATH", "")
    if root not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (os.pathsep + pp if pp else "")


def bind_local_to_loopback() -> None:
    """Make a local Ray instance listen on 127.0.0.1 only (what Ray does on macOS/Windows).

    Ray reads this when it is imported, and it holds for the whole process (a later connection to a
    remote cluster from the same process would advertise 127.0.0.1), so only the CLI calls it, before
    anything imports ray.
    """
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _check_reachable(addr: str, timeout: float = 10.0) -> None:
    """Fail fast on ``host:port`` / ``ray://host:port`` nobody listens on (ray.init would retry for long)."""
    import socket

    text = addr.split("://", 1)[1] if "://" in addr else addr
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc.strerror or exc})") from None


def connect(address: str | None) -> tuple[bool, str]:
    """Connect to (or start) Ray; returns (whether we must shut it down, a description)."""
    if address in (None, "", "local") and not (address is None and os.environ.get("RAY_ADDRESS")):
        _prepare_local_env()
    import ray

    if ray.is_initialized():
        return False, "existing Ray connection"
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    if addr != "auto" and addr != "local":
        _check_reachable(addr)
    try:
        with _encodable_argv_and_path():
            return _init(ray, addr)
    except SystemExit as exc:  # Ray's own SIGTERM handler (sys.exit(15)) fired while it was starting
        if exc.code == signal.SIGTERM and interrupts.installed():
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise KeyboardInterrupt from None
        raise
    finally:  # ray.init installs its own SIGTERM handler: the CLI's (stop at a safe point) stays in force
        interrupts.keep_ours()


@contextlib.contextmanager
def _encodable_argv_and_path():
    """Ray sends the driver's argv and sys.path as UTF-8: a folder name with undecodable bytes (an image
    folder, the working folder) is shown in its escaped text form there, for the time of ``ray.init``."""
    from lrp_ray.results import image_text

    lists = [lst for lst in (sys.argv, sys.path, getattr(sys, "orig_argv", None)) if lst is not None]
    saved = [list(lst) for lst in lists]
    for lst in lists:
        lst[:] = [image_text(x) if isinstance(x, str) else x for x in lst]
    # Ray also reads the process's command line from the OS (its job "entrypoint")
    utils = sys.modules.get("ray._private.utils")
    entrypoint = getattr(utils, "get_entrypoint_name", None)
    if entrypoint is not None:
        utils.get_entrypoint_name = lambda: image_text(entrypoint())
    cwd = os.getcwd()
    if image_text(cwd) != cwd:  # Ray hands the working folder to its workers as UTF-8 text
        os.chdir(Path(__file__).resolve().parents[2])
    try:
        yield
    finally:
        os.chdir(cwd)
        for lst, old in zip(lists, saved, strict=True):
            lst[:] = old
        if entrypoint is not None:
            utils.get_entrypoint_name = entrypoint


def _init(ray: Any, addr: str) -> tuple[bool, str]:
    if addr == "local":
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=True)
        return True, "local Ray instance (127.0.0.1)"
    ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=True)
    return True, f"Ray cluster at {addr}"


def _check_local_fit(n: int, opts: dict, cpus: float, gpus: float) -> None:
    """A private local Ray instance never grows: refuse actors it can never start (they would wait)."""
    need_cpu, need_gpu = n * opts["num_cpus"], n * opts["num_gpus"]
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        have = f"{cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if opts["num_gpus"] else "")
        want = f"{need_cpu:g} CPU(s)" + (f" and {need_gpu:g} GPU(s)" if opts["num_gpus"] else "")
        raise BadRequest(f"--actors {n} x --cpus-per-actor {opts['num_cpus']}"
                         + (f" x --gpus-per-actor {opts['num_gpus']:g}" if opts["num_gpus"] else "")
                         + f" needs {want}; this machine's Ray instance has {have}: ask for fewer")


def actor_plan(spec: RunSpec, local: bool) -> tuple[int, dict, str]:
    """How many actors, their Ray options and their device, from the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    device = spec.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda":
        if gpus <= 0:
            if local:
                raise BadRequest("--device cuda: this machine's Ray instance has no GPU "
                                 "(use --device cpu or auto)")
            log.warning("no GPU in the cluster yet; actors wait for the autoscaler")
        n = (max(1, int(math.floor(gpus / spec.gpus_per_actor + 1e-9))) if spec.actors == "auto"
             else int(spec.actors))
        opts = {"num_gpus": spec.gpus_per_actor, "num_cpus": spec.cpus_per_actor}
    else:
        n = max(1, int(cpus // spec.cpus_per_actor)) if spec.actors == "auto" else int(spec.actors)
        opts = {"num_cpus": spec.cpus_per_actor, "num_gpus": 0}
    if local:
        _check_local_fit(n, opts, cpus, gpus)
    return n, {**opts, "max_restarts": 3, "max_task_retries": 2}, device
