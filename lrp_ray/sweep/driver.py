"""The sweep driver: validate, plan, schedule work items on actors with ``ray.wait``, write, summarise.

Scheduling (not ``ActorPool``, which does not resubmit failed work):

- every actor has at most ``max_in_flight`` items queued; slots are filled round-robin;
- an actor first takes items of batches whose forward cache it holds (cache hits), then adopts a batch
  whose holder was lost, then opens the next batch (its first item runs the forward; the live-cache byte
  budget caps how many batches are open), and only then takes items of a batch another actor holds: the
  holder exports the cache (numpy) into the object store and the thief imports it (a cache transfer);
- failed items are resubmitted (they are idempotent); application errors count against
  ``max_item_retries``; an actor that stops answering pings for ``ping_timeout_s`` (node lost, restart
  pending) has its queued items moved to other actors; actors restart (``max_restarts``) and replacements
  are started for actors that are gone for good.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import (
    DEMO_IMAGES,
    ImageError,
    ImageInfo,
    discover,
    duplicate_groups,
    validate,
    write_synthetic_images,
)
from .plan import Batch, Plan, WorkItem, make_plan
from .spec import BadRequest, SweepSpec, check_queries, format_indices, resolve_indices, spec_hash
from .writer import OWNED_NAMES, atomic_write_text, clean_temp_files, clear_outputs, done_keys, write_part

__all__ = ["Prepared", "SweepResult", "SweepFailed", "OutputError", "prepare", "execute", "run_sweep",
           "in_ray_job", "EXIT_OK", "EXIT_IMAGES_FAILED", "EXIT_BAD_REQUEST", "EXIT_INCOMPLETE",
           "EXIT_OUTPUT", "EXIT_INTERRUPTED"]

log = logging.getLogger("lrp_ray.sweep")

EXIT_OK, EXIT_IMAGES_FAILED, EXIT_BAD_REQUEST, EXIT_INCOMPLETE, EXIT_OUTPUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RESULTS_ROOT_ENV = "LRP_RAY_RESULTS"
"""Inside a Ray job, a relative --out is resolved against this folder (default ``~/lrp_ray_results``)."""


class SweepFailed(RuntimeError):
    """The sweep could not finish (no actors left, or stalled)."""


class OutputError(RuntimeError):
    """OUT could not be written (disk full, read-only, a file where a folder must go): exit code 4.

    Every result file is written to a temp name and renamed, and a failed write removes its temp file, so
    what OUT holds stays complete; the same command resumes once the cause is fixed.
    """

    def __init__(self, exc: BaseException, what: str = "results") -> None:
        self.cause = exc
        super().__init__(f"cannot write {what} ({_one_line(exc, 300)}); files already in OUT are complete "
                         "and nothing partial was left: free space or fix OUT, then run the same command "
                         "again to resume")


def in_ray_job() -> bool:
    """True when running as the entrypoint of ``ray job submit`` (its working dir is temporary)."""
    return JOB_ENV in os.environ


# ------------------------------------------------------------------------------------------- preparing
@dataclass
class Prepared:
    spec: SweepSpec
    out: Path
    out_note: str
    image_root: Path
    images: list[ImageInfo]
    errors: list[ImageError]
    duplicates: list[list[str]]
    model_cfg: Any
    state: dict
    dims: dict[str, int]
    layers: dict[str, list[int]]
    features: list[int]
    queries: Any
    plan: Plan
    hash: str
    result_key: dict
    done: set[str]
    resumed: bool
    old_manifest: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)


def resolve_out(out: str) -> tuple[Path, str]:
    if "://" in out:
        raise BadRequest(f"--out {out}: must be a folder path on the driver's machine "
                         "(URIs are not supported)")
    p = Path(out).expanduser()
    note = ""
    if not p.is_absolute():
        if in_ray_job():
            base = Path(os.environ.get(RESULTS_ROOT_ENV, "~/lrp_ray_results")).expanduser().resolve()
            p = base / p
            note = (f"relative --out inside a Ray job resolved against {base} (the job's working dir is "
                    f"temporary; set ${RESULTS_ROOT_ENV} or pass an absolute --out)")
        else:
            p = Path.cwd() / p
    p = Path(os.path.abspath(p))
    if p.exists() and not p.is_dir():
        raise BadRequest(f"--out {out}: is a file; give a folder (new or from an earlier sweep)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadRequest(f"--out {out}: {parent} is a file, not a folder")
            break
    return p, note


def _read_manifest(out: Path) -> dict | None:
    m = out / "manifest.json"
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())
    except (OSError, ValueError):
        return None


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_model(spec: SweepSpec, log_fn: Callable[[str], None]) -> Any:
    import torch

    from lrp_ray.models import load_model

    if spec.config is not None and not Path(spec.config).expanduser().is_file():
        raise BadRequest(f"--config {spec.config}: file not found")
    if spec.weights is not None and not Path(spec.weights).expanduser().is_file():
        raise BadRequest(f"--weights {spec.weights}: file not found")
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_model(spec.config, spec.weights, list(spec.overrides), device="cpu")
        for w in caught:
            log_fn(f"note: {w.message}")
        return model
    except (FileNotFoundError, PermissionError) as exc:
        raise BadRequest(_one_line(exc)) from None
    except Exception as exc:  # ConfigError, CheckpointError (weights that do not fit), ...
        kind = type(exc).__name__
        what = "model"
        if spec.weights and "heckpoint" in kind:
            what = "--weights"
        elif spec.config and "Config" in kind and str(Path(spec.config).expanduser()) in str(exc):
            what = "--config"
        raise BadRequest(f"{what}: {_one_line(exc)}") from None


def _file_sha(path: str | None) -> str | None:
    import hashlib

    if path is None:
        return None
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(spec: SweepSpec, log_fn: Callable[[str], None] = print) -> Prepared:
    """Everything that can fail because of the request, before Ray or any actor starts."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out, note = resolve_out(spec.out)
    manifest = _read_manifest(out)
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and manifest is None and not spec.overwrite:
        ours = [n for n in OWNED_NAMES if (out / n).exists()]
        what = "results of an unfinished or unknown sweep" if ours else "other files"
        raise BadRequest(f"--out {out}: folder is not empty ({what}, no manifest.json); choose an empty or "
                         "new folder, or pass --overwrite")
    if not spec.resume and not spec.overwrite and manifest is not None:
        raise BadRequest(f"--out {out}: holds an earlier sweep; resume it (default) or pass --overwrite")

    # images
    if spec.images is not None:
        image_set = discover(spec.images, exclude=out)
    elif DEMO_IMAGES.is_dir() and any(DEMO_IMAGES.iterdir()):
        image_set = discover(str(DEMO_IMAGES))
    else:
        image_set = discover(str(write_synthetic_images(out / "_cache" / "synthetic_images")))
    timings["discover"] = time.perf_counter() - t0

    # model (also validates config / weights)
    t1 = time.perf_counter()
    model = _load_model(spec, log_fn)
    from lrp_ray.models import from_module

    parts = from_module(model)
    dims = {"encoder": len(parts.transformer.encoder.layers),
            "decoder": len(parts.transformer.decoder.layers),
            "hidden_dim": int(parts.hidden_dim), "num_queries": int(parts.num_queries)}
    layers = {}
    for m in spec.modules:
        layers[m] = resolve_indices(spec.layers, dims[m], f"{m} layers")
    features = resolve_indices(spec.features, dims["hidden_dim"], "features")
    queries = check_queries(spec.queries, dims["num_queries"]) if "decoder" in spec.modules else None
    state = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    cfg = model.cfg
    timings["model_load"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    ok, bad = validate(image_set)
    timings["validate_images"] = time.perf_counter() - t2

    per_feature = {"encoder": 1}
    if "decoder" in spec.modules:
        if queries == "all":
            per_feature["decoder"] = dims["num_queries"]
        elif isinstance(queries, str):
            per_feature["decoder"] = int(queries[3:])
        else:
            per_feature["decoder"] = len(queries)
    t3 = time.perf_counter()
    plan = make_plan([i.name for i in ok], spec.batch_size, layers, features, spec.feature_chunk, per_feature)
    timings["plan"] = time.perf_counter() - t3

    result_key = {
        **{k: getattr(spec, k) for k in ("module", "rules", "epsilon", "precision", "batch_size")},
        "layers": layers, "features": format_indices(features), "queries": queries,
        "item_features": plan.item_features,
        "model": cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else repr(cfg),
        "weights_sha256": _file_sha(spec.weights),
        "images": [[i.name, i.sha1] for i in ok] + [[e.name, "error"] for e in bad],
    }
    h = spec_hash(result_key)
    resumed = False
    if manifest is not None and not spec.overwrite:
        if manifest.get("spec_hash") != h:
            old = manifest.get("spec", {})
            diff = sorted(k for k in set(old) | set(spec.model_dump())
                          if old.get(k) != spec.model_dump().get(k) and k not in _RUN_ONLY)
            why = f" (differs in: {', '.join(diff)})" if diff else " (model weights or images changed)"
            raise BadRequest(f"--out {out}: holds results of a different sweep{why}; use another --out or "
                             "pass --overwrite")
        resumed = True
    timings["prepare"] = time.perf_counter() - t0
    return Prepared(spec=spec, out=out, out_note=note, image_root=image_set.root, images=ok, errors=bad,
                    duplicates=duplicate_groups(ok), model_cfg=cfg, state=state, dims=dims, layers=layers,
                    features=features, queries=queries, plan=plan, hash=h, result_key=result_key, done=set(),
                    resumed=resumed, old_manifest=manifest, timings=timings)


_RUN_ONLY = {"out", "actors", "gpus_per_actor", "cpus_per_actor", "device", "compile", "address",
             "resume", "overwrite", "heatmaps", "cache_budget_mb", "max_in_flight", "max_item_retries",
             "ping_timeout_s", "description"}


# ------------------------------------------------------------------------------------------- running
@dataclass
class SweepResult:
    out: Path
    exit_code: int
    manifest: dict
    errors: list[ImageError]
    failed_items: dict[str, str]


class _BatchState:
    def __init__(self, batch: Batch, items: list[WorkItem]) -> None:
        self.batch = batch
        self.pending: deque[WorkItem] = deque(items)
        self.remaining = len(items)
        self.inflight = 0
        self.opened = False
        self.images_ref: Any = None
        self.owner: int | None = None
        self.holders: set[int] = set()
        self.ready = False
        self.export_ref: Any = None
        self.nbytes = 0


class _ActorState:
    def __init__(self, idx: int, handle: Any) -> None:
        self.idx = idx
        self.handle = handle
        self.inflight: set[Any] = set()
        self.available = True
        self.dead = False
        self.started = False
        self.pid: int | None = None
        self.ping_ref: Any = None
        self.ping_sent = 0.0
        self.last_answer = time.monotonic()
        self.created = time.monotonic()
        self.info: dict = {}


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
    if addr == "local":
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=True)
        return True, "local Ray instance (127.0.0.1)"
    if addr != "auto":
        _check_reachable(addr)
    ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=True)
    return True, f"Ray cluster at {addr}"


class _Scheduler:
    def __init__(self, prep: Prepared, todo: list[WorkItem], on_event: Callable[..., None] | None,
                 log_fn: Callable[[str], None], bar: Any) -> None:
        import ray

        self.ray = ray
        self.prep = prep
        self.spec = prep.spec
        self.on_event = on_event or (lambda *a, **k: None)
        self.log = log_fn
        self.bar = bar
        self.dataset = prep.out / "relevance"
        self.n_batches = len(prep.plan.batches)
        by_batch: dict[int, list[WorkItem]] = {}
        for it in todo:
            by_batch.setdefault(it.batch, []).append(it)
        self.batches = {b: _BatchState(prep.plan.batches[b], items) for b, items in sorted(by_batch.items())}
        self.unopened = deque(sorted(self.batches))
        self.live: dict[int, _BatchState] = {}  # opened and not finished, in batch order
        self.items = {it.uid: it for it in todo}
        self.remaining = len(todo)
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.sys_attempts: dict[str, int] = {}
        self.inflight: dict[Any, tuple[int, str]] = {}
        self.actors: list[_ActorState] = []
        self.replacements = 0
        self.max_replacements = 2
        self.last_death = ""
        self.budget = int(self.spec.cache_budget_mb) << 20
        self.max_nbytes = 0
        self.stats = {"forward_passes": 0, "cache_hits": 0, "cache_transfers": 0, "exports": 0,
                      "duplicate_results": 0, "item_retries": 0, "reassigned": 0, "actor_restarts": 0,
                      "actors_replaced": 0, "maps": 0, "rows": 0}
        # seconds of this run: driver-side image reads and part writes; actor-side (summed over the items
        # that were written) preprocessing, forward, cache import, propagation, result table
        self.seconds = dict.fromkeys(("read_images", "writing", "decode", "forward", "import", "relevance",
                                      "table"), 0.0)
        self.profile_names: dict[str, list[str]] = {}
        self.actor_peaks: dict[str, dict] = {}
        self.t_last_progress = time.monotonic()
        self.drop_refs: deque[Any] = deque(maxlen=64)
        self.t_nodes = time.monotonic()
        self.node_lost = False
        try:
            self.nodes_alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception:
            self.nodes_alive = set()

    # -------------------------------------------------------------- actors
    def start_actors(self, n: int, options: dict, args: tuple) -> None:
        from .actor import LrpWorker

        self._actor_cls = LrpWorker
        self._actor_opts = options
        self._actor_args = args
        self.max_replacements = max(2, 2 * n)
        for _ in range(n):
            self._new_actor()
        self.on_event("actors_started", handles=[a.handle for a in self.actors])

    def _new_actor(self) -> _ActorState:
        handle = self._actor_cls.options(**self._actor_opts).remote(*self._actor_args)
        a = _ActorState(len(self.actors), handle)
        self.actors.append(a)
        return a

    def stop_actors(self) -> None:
        if self.drop_refs:
            try:
                self.ray.wait(list(self.drop_refs), num_returns=len(self.drop_refs), timeout=5)
            except Exception:
                pass
        for a in self.actors:
            try:
                self.ray.kill(a.handle, no_restart=True)
            except Exception:
                pass

    def _forget_holder(self, idx: int) -> None:
        for bs in self.live.values():
            bs.holders.discard(idx)
            if bs.owner == idx:
                bs.owner = None

    def _mark_unavailable(self, a: _ActorState, why: str) -> None:
        if a.available:
            self.log(f"actor {a.idx} unavailable ({why}); moving its {len(a.inflight)} queued item(s)")
        a.available = False
        self._forget_holder(a.idx)
        for ref in list(a.inflight):
            _, uid = self.inflight.pop(ref)
            self._requeue(uid)
            self.stats["reassigned"] += 1
        a.inflight.clear()

    def _mark_dead(self, a: _ActorState, why: str) -> None:
        if a.dead:
            return
        self._mark_unavailable(a, why)
        a.dead = True
        a.ping_ref = None
        self.last_death = why
        if self.replacements < self.max_replacements:
            self.replacements += 1
            self.stats["actors_replaced"] += 1
            new = self._new_actor()
            self.log(f"actor {a.idx} is gone ({why}); started actor {new.idx} in its place")

    def _seen_pid(self, a: _ActorState, pid: int) -> None:
        if a.pid is not None and pid != a.pid:
            self.stats["actor_restarts"] += 1
            self._forget_holder(a.idx)
            self.log(f"actor {a.idx} restarted (its forward caches are gone)")
        a.pid = pid
        a.started = True
        a.last_answer = time.monotonic()

    # -------------------------------------------------------------- scheduling
    def _actor_bytes(self, idx: int) -> int:
        """Bytes of the live forward caches actor ``idx`` holds (or is computing)."""
        return sum(bs.nbytes for bs in self.live.values() if idx in bs.holders or bs.owner == idx)

    def _holds_live(self, idx: int) -> bool:
        return any(idx in bs.holders or bs.owner == idx for bs in self.live.values())

    def _fits(self, idx: int, extra: int) -> bool:
        """May actor ``idx`` take on another cache of ``extra`` bytes? (always, when it holds none)"""
        return not self._holds_live(idx) or self._actor_bytes(idx) + extra <= self.budget

    def _open_batch(self, bs: _BatchState, a: _ActorState) -> None:
        from lrp_ray.models import read_image

        t0 = time.perf_counter()
        images = [read_image(self.prep.image_root / name) for name in bs.batch.images]
        self.seconds["read_images"] += time.perf_counter() - t0
        bs.images_ref = self.ray.put(images)
        bs.opened = True
        bs.owner = a.idx
        self.live[bs.batch.index] = bs

    def _pick(self, a: _ActorState) -> tuple[_BatchState, WorkItem, Any] | None:
        open_batches = [bs for bs in self.live.values() if bs.pending]
        for bs in open_batches:  # 1. cache hits (or queued behind our own forward)
            if a.idx in bs.holders or bs.owner == a.idx:
                return bs, bs.pending.popleft(), None
        for bs in open_batches:  # 2. adopt a batch whose holders are gone
            if bs.owner is None and not bs.holders:
                bs.owner = a.idx
                return bs, bs.pending.popleft(), None
        while self.unopened:  # 3. open the next batch
            bs = self.batches[self.unopened[0]]
            if not bs.pending:
                self.unopened.popleft()
                continue
            if not self._fits(a.idx, self.max_nbytes):
                break
            self.unopened.popleft()
            try:
                self._open_batch(bs, a)
            except Exception as exc:  # an image changed or vanished since it was validated
                for it in list(bs.pending):
                    self._fail(it.uid, f"cannot read the batch's images: {_one_line(exc)}")
                bs.pending.clear()
                continue
            return bs, bs.pending.popleft(), None
        # 4. take over work of a batch another actor holds (its cache travels through the object store)
        best = None
        for bs in open_batches:
            if bs.ready and bs.holders and a.idx not in bs.holders and len(bs.pending) >= 2:
                if not self._fits(a.idx, bs.nbytes):
                    continue
                if best is None or len(bs.pending) > len(best.pending):
                    best = bs
        if best is None:
            return None
        if best.export_ref is None:
            exporters = [self.actors[i] for i in sorted(best.holders) if self.actors[i].available]
            if not exporters:
                return None
            best.export_ref = exporters[0].handle.export_cache.remote(best.batch.key)
            self.stats["exports"] += 1
        return best, best.pending.popleft(), best.export_ref

    def _submit(self, a: _ActorState, bs: _BatchState, it: WorkItem, cache_ref: Any) -> None:
        item = {"uid": it.uid, "batch_key": bs.batch.key, "module": it.module, "layer": it.layer,
                "features": list(it.features), "queries": self.prep.queries,
                "targets_per_feature": it.targets_per_feature}
        ref = a.handle.run_item.remote(item, list(bs.batch.images), [bs.images_ref],
                                       [cache_ref] if cache_ref is not None else None)
        self.inflight[ref] = (a.idx, it.uid)
        a.inflight.add(ref)
        bs.inflight += 1

    def _fill(self) -> None:
        for slot in range(self.spec.max_in_flight):
            for a in self.actors:
                if a.available and not a.dead and len(a.inflight) <= slot:
                    choice = self._pick(a)
                    if choice is not None:
                        self._submit(a, *choice)

    def _requeue(self, uid: str) -> None:
        it = self.items[uid]
        bs = self.batches[it.batch]
        bs.inflight = max(0, bs.inflight - 1)
        if uid in self.done or uid in self.failed:
            return
        bs.pending.appendleft(it)

    def _fail(self, uid: str, reason: str) -> None:
        if uid in self.failed or uid in self.done:
            return
        it = self.items[uid]
        self.failed[uid] = reason
        self.remaining -= 1
        bs = self.batches[it.batch]
        bs.remaining -= 1
        self.log(f"FAILED {it.label(self.n_batches)}: {reason}")
        if bs.remaining == 0:
            self._close(bs)

    def _close(self, bs: _BatchState) -> None:
        for idx in bs.holders | ({bs.owner} if bs.owner is not None else set()):
            a = self.actors[idx]
            if a.available and not a.dead:
                self.drop_refs.append(a.handle.drop.remote([bs.batch.key]))
        bs.images_ref = None
        bs.export_ref = None
        bs.holders.clear()
        bs.owner = None
        self.live.pop(bs.batch.index, None)

    # -------------------------------------------------------------- results
    def _on_result(self, ref: Any) -> None:
        idx, uid = self.inflight.pop(ref)
        a = self.actors[idx]
        a.inflight.discard(ref)
        it = self.items[uid]
        bs = self.batches[it.batch]
        bs.inflight = max(0, bs.inflight - 1)
        try:
            payload = self.ray.get(ref, timeout=600)
        except self.ray.exceptions.RayActorError as exc:
            gone = isinstance(exc, self.ray.exceptions.ActorDiedError)
            self._on_system_error(a, uid, exc, actor_gone=gone)
            return
        except (self.ray.exceptions.ObjectLostError, self.ray.exceptions.WorkerCrashedError,
                self.ray.exceptions.NodeDiedError, self.ray.exceptions.GetTimeoutError) as exc:
            self._on_system_error(a, uid, exc, actor_gone=False)
            return
        except self.ray.exceptions.RayTaskError as exc:
            self.attempts[uid] = self.attempts.get(uid, 0) + 1
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            reason = f"{type(cause).__name__}: {_one_line(cause, 300)}"
            if self.attempts[uid] >= self.spec.max_item_retries:
                self._fail(uid, reason)
            else:
                self.stats["item_retries"] += 1
                self.log(f"retrying {it.label(self.n_batches)} after error: {reason}")
                self._requeue_fresh(uid)
            return
        except self.ray.exceptions.RayError as exc:  # e.g. a worker killed by Ray's memory monitor
            self._on_system_error(a, uid, exc, actor_gone=False)
            return
        self._seen_pid(a, payload["pid"])
        if uid in self.done or uid in self.failed:
            self.stats["duplicate_results"] += 1
            return
        table = payload["table"]
        t0 = time.perf_counter()
        try:
            write_part(self.dataset, it.part_relpath, table)
        except OSError as exc:  # disk full, read-only, a file where a folder must go: stop cleanly
            raise OutputError(exc, f"{self.dataset / it.part_relpath}") from exc
        self.seconds["writing"] += time.perf_counter() - t0
        for k, v in (payload.get("timings") or {}).items():
            if k in self.seconds:
                self.seconds[k] += float(v)
        self.done.add(uid)
        self.remaining -= 1
        bs.remaining -= 1
        bs.ready = True
        bs.holders.add(idx)
        bs.nbytes = max(bs.nbytes, int(payload.get("footprint", payload["cache_nbytes"])))
        self.max_nbytes = max(self.max_nbytes, bs.nbytes)
        src = payload["source"]
        self.stats["forward_passes"] += int(src == "forward")
        self.stats["cache_hits"] += int(src == "local")
        self.stats["cache_transfers"] += int(src == "import")
        self.stats["maps"] += it.n_maps
        self.stats["rows"] += table.num_rows
        self.profile_names.setdefault(f"{it.module}/{it.layer}", payload["profile_names"])
        self.actor_peaks[str(idx)] = {"peak_rss": payload["peak_rss"], "peak_device": payload["peak_device"]}
        self.t_last_progress = time.monotonic()
        self.log(f"{it.label(self.n_batches)} {payload['seconds']:.2f}s [{src}, actor {idx}]")
        if self.bar is not None:
            self.bar.update(it.n_maps)
        self.on_event("item_done", uid=uid, done=len(self.done), total=len(self.items), actor=idx)
        if bs.remaining == 0:
            self._close(bs)

    def _requeue_fresh(self, uid: str) -> None:
        it = self.items[uid]
        bs = self.batches[it.batch]
        if uid not in self.done and uid not in self.failed:
            bs.pending.appendleft(it)

    def _on_system_error(self, a: _ActorState, uid: str, exc: Exception, actor_gone: bool) -> None:
        self.sys_attempts[uid] = self.sys_attempts.get(uid, 0) + 1
        if actor_gone:
            self._mark_dead(a, _one_line(exc, 400))
        else:
            self._forget_holder(a.idx)
        if self.sys_attempts[uid] > 10:
            self._fail(uid, f"gave up after repeated worker failures: {_one_line(exc, 200)}")
        else:
            self.stats["item_retries"] += 1
            self._requeue_fresh(uid)

    # -------------------------------------------------------------- health
    def _watch_nodes(self, now: float) -> None:
        """Notice nodes leaving the cluster (then actors still starting get the normal ping timeout)."""
        if now - self.t_nodes < 5.0:
            return
        self.t_nodes = now
        try:
            alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        except Exception:
            return
        lost = self.nodes_alive - alive
        if lost:
            self.node_lost = True
            self.log(f"{len(lost)} node(s) left the cluster")
        self.nodes_alive = alive

    def _health(self, now: float) -> None:
        """Ping every actor (own concurrency group: answers while busy); move work off silent ones."""
        self._watch_nodes(now)
        timeout = float(self.spec.ping_timeout_s)
        startup_timeout = max(10 * timeout, 600.0)  # model shipping, CUDA init, a GPU node booting
        for a in self.actors:
            if a.dead:
                continue
            if a.ping_ref is None:
                if now - a.ping_sent >= min(5.0, timeout / 2):
                    a.ping_ref = a.handle.ping.remote()
                    a.ping_sent = now
                continue
            limit = timeout if (a.started or self.node_lost) else startup_timeout
            if a.available and now - a.ping_sent > limit:
                self._mark_unavailable(a, f"no answer for {now - a.ping_sent:.0f}s")

    def _on_ping(self, a: _ActorState) -> None:
        ref, a.ping_ref = a.ping_ref, None
        try:
            info = self.ray.get(ref, timeout=60)
        except self.ray.exceptions.ActorDiedError as exc:
            self._mark_dead(a, _one_line(exc, 400))
            return
        except Exception as exc:  # restarting / unavailable: ask again later
            self._mark_unavailable(a, _one_line(exc, 120))
            return
        self._seen_pid(a, info["pid"])
        a.info = info
        if not a.available:
            a.available = True
            self.log(f"actor {a.idx} is back")

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        ray = self.ray
        stall_limit = max(600.0, 10 * float(self.spec.ping_timeout_s))
        while self.remaining > 0:
            self._fill()
            pings = {a.ping_ref: a for a in self.actors if a.ping_ref is not None and not a.dead}
            refs = list(self.inflight) + list(pings)
            if not refs:
                if not any(not a.dead for a in self.actors):
                    raise SweepFailed(f"no worker actors left (last error: {self.last_death})")
                self._health(time.monotonic())
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            if ready:
                more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                ready = list(dict.fromkeys(ready + more))
            for ref in ready:
                if ref in self.inflight:
                    self._on_result(ref)
                elif ref in pings:
                    self._on_ping(pings[ref])
            now = time.monotonic()
            self._health(now)
            if now - self.t_last_progress > stall_limit and not any(a.available for a in self.actors):
                raise SweepFailed(f"no progress for {now - self.t_last_progress:.0f}s and no actor answers")

    def final_actor_info(self) -> list[dict]:
        out = []
        refs = {a.idx: a.handle.ping.remote() for a in self.actors if not a.dead and a.available}
        for idx, ref in refs.items():
            try:
                info = self.ray.get(ref, timeout=10)
                keys = ("pid", "node", "device", "stats", "peak_rss", "peak_device")
                out.append({"actor": idx, **{k: info[k] for k in keys}})
            except Exception:
                out.append({"actor": idx, "error": "no answer"})
        return out


class _TextProgress:
    """Progress as log lines (maps done/total, maps per second, ETA) for non-terminal output."""

    def __init__(self, total: int, initial: int, log_fn: Callable[[str], None], every: float = 10.0) -> None:
        self.total, self.n, self.log, self.every = total, initial, log_fn, every
        self.start_n, self.t0 = initial, time.monotonic()
        self.last = self.t0

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        eta_txt = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        return (f"progress: {self.n}/{self.total} maps ({100.0 * self.n / max(self.total, 1):.1f}%), "
                f"{rate:.1f} maps/s, ETA {eta_txt}")

    def clear(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _actor_plan(spec: SweepSpec, local: bool) -> tuple[int, dict, str]:
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
    return n, {**opts, "max_restarts": 3, "max_task_retries": 2}, device


def _versions() -> dict:
    import numpy
    import pandas
    import pyarrow
    import ray
    import torch

    import lrp_ray

    return {"lrp_ray": lrp_ray.__version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "pandas": pandas.__version__}


def _base_manifest(prep: Prepared, status: str) -> dict:
    spec = prep.spec
    return {
        "status": status, "spec": spec.model_dump(mode="json"), "spec_hash": prep.hash,
        "result_key": {k: v for k, v in prep.result_key.items() if k != "images"},
        "out": str(prep.out), "images_root": str(prep.image_root), "versions": _versions(),
        "model": {"dims": prep.dims, "config": prep.result_key.get("model")},
        "selection": {"layers": {m: format_indices(v) for m, v in prep.layers.items()},
                      "features": format_indices(prep.features), "queries": prep.queries},
        "duplicate_images": prep.duplicates,
    }


def execute(prep: Prepared, *, log_fn: Callable[[str], None] = print, progress: bool | None = None,
            on_event: Callable[..., None] | None = None) -> SweepResult:
    """Run the prepared sweep: actors, scheduling, writing, summary, manifest.

    Exit codes: see the ``EXIT_*`` constants (documented in the CLI's ``--help``). A result file that cannot
    be written (disk full, read-only OUT) stops the sweep with :data:`EXIT_OUTPUT`; nothing partial is left
    and the same request resumes once OUT is writable again.
    """
    from .summary import write_errors, write_summary

    t_start = time.perf_counter()
    spec, out = prep.spec, prep.out
    dataset = out / "relevance"
    finished = set() if spec.overwrite else done_keys(dataset)
    todo = [it for it in prep.plan.items if it.part_relpath not in finished]

    # Ray first: a cluster that cannot be reached must not cost the results already in OUT (--overwrite)
    shutdown, run_desc = False, "nothing to compute"
    n_actors, opts, device, nodes = 0, {}, None, []
    t_ray = time.perf_counter()
    if todo:
        try:
            shutdown, run_desc = connect(spec.address)
        except Exception as exc:
            where = spec.address or os.environ.get("RAY_ADDRESS") or "local"
            raise BadRequest(f"--address {where}: cannot start or reach Ray "
                             f"({_one_line(exc, 300)})") from None
        import ray

        try:
            n_actors, opts, device = _actor_plan(spec, "local" in run_desc)
        except BadRequest:
            if shutdown:
                ray.shutdown()
            raise
        n_actors = max(1, min(n_actors, len(todo)))
        nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    ray_start = time.perf_counter() - t_ray

    n_items = len(prep.plan.items)
    skipped = n_items - len(todo)
    total_maps = prep.plan.total_maps
    maps_before = sum(it.n_maps for it in prep.plan.items if it.part_relpath in finished)
    status = "complete"
    sched = None
    actors_info: list[dict] = []
    exit_code = EXIT_OK
    t_sweep = 0.0
    output_error: OutputError | None = None
    try:
        try:
            if spec.overwrite:
                clear_outputs(out)
            dataset.mkdir(parents=True, exist_ok=True)
            clean_temp_files(dataset)
            if prep.out_note:
                log_fn(prep.out_note)
            log_fn(f"results: {out}")
            if skipped:
                log_fn(f"resuming: {skipped} of {n_items} work items already done")
            write_errors(out, prep.errors)
            manifest = _base_manifest(prep, "running")
            atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
        except OSError as exc:
            raise OutputError(exc, f"to {out}") from exc
        if todo:
            import ray

            t_put = time.perf_counter()
            engine_opts = {"rules": spec.rules, "epsilon": spec.epsilon, "precision": spec.precision,
                           "device": device, "compile": spec.compile}
            state_ref = ray.put(prep.state)
            ray_start += time.perf_counter() - t_put
            per_actor_budget = int(spec.cache_budget_mb) << 20
            chunk = None if spec.feature_chunk == "auto" else int(spec.feature_chunk)
            log_fn(f"{run_desc}: {n_actors} actor(s) on {device}, {len(todo)} work items, "
                   f"{len(prep.plan.batches)} image batches")
            bar = None
            show = True if progress is None else progress
            if show and sys.stderr.isatty():
                from tqdm import tqdm

                bar = tqdm(total=total_maps, initial=maps_before, unit="maps", desc="relevance maps",
                           file=sys.stderr, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
            elif show:  # logs (ray job logs, files): a progress line every 10 s instead of a bar
                bar = _TextProgress(total_maps, maps_before, log_fn)
            slog = log_fn
            if bar is not None and not isinstance(bar, _TextProgress):
                def slog(line: str, _bar=bar) -> None:
                    _bar.clear()
                    log_fn(line)
                    _bar.refresh()
            sched = _Scheduler(prep, todo, on_event, slog, bar)
            t0 = time.perf_counter()
            # the actor's own LRU is a safety net above the driver's accounting (which never lets an actor
            # hold more than the budget, except one batch when that alone is larger)
            sched.start_actors(n_actors, opts, (prep.model_cfg, [state_ref], engine_opts, spec.cpus_per_actor,
                                                2 * per_actor_budget, chunk))
            try:
                sched.run()
            finally:
                t_sweep = time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                actors_info = sched.final_actor_info()
                sched.stop_actors()
            if sched.failed:
                status = "incomplete"
                exit_code = EXIT_INCOMPLETE
    except KeyboardInterrupt:
        status, exit_code = "interrupted", EXIT_INTERRUPTED
        log_fn("interrupted: finished work items are kept; run the same command again to resume")
        if sched is not None:
            sched.stop_actors()
    except SweepFailed as exc:
        status, exit_code = "incomplete", EXIT_INCOMPLETE
        log_fn(f"sweep stopped: {exc}; finished work items are kept; run again to resume")
        if sched is not None:
            sched.stop_actors()
    except OutputError as exc:
        status, exit_code, output_error = "output_error", EXIT_OUTPUT, exc
        log_fn(f"sweep stopped: {exc}")
        if sched is not None:
            sched.stop_actors()
    finally:
        if shutdown:
            import ray

            ray.shutdown()

    t_sum = time.perf_counter()
    summary = None
    if status not in ("interrupted", "output_error"):
        try:
            summary = write_summary(out)
        except OSError as exc:
            output_error = OutputError(exc, f"{out / 'summary.csv'}")
            status, exit_code = "output_error", EXIT_OUTPUT
            log_fn(f"sweep stopped: {output_error}")
    t_sum = time.perf_counter() - t_sum
    heatmaps = None
    if spec.heatmaps and status == "complete":
        heatmaps = _render_heatmaps(prep, log_fn)

    stats = dict(sched.stats) if sched else {"forward_passes": 0, "cache_hits": 0, "cache_transfers": 0}
    if exit_code == EXIT_OK and prep.errors:
        exit_code = EXIT_IMAGES_FAILED
    failed_items = dict(sched.failed) if sched else {}
    manifest = _base_manifest(prep, status)
    peak_driver = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    sec = dict(sched.seconds) if sched else {}
    manifest.update({
        "run": {"ray": run_desc, "nodes": nodes, "actors": n_actors, "device": device,
                "actors_info": actors_info},
        "counts": {
            "images_found": len(prep.images) + len(prep.errors), "images_ok": len(prep.images),
            "images_failed": len(prep.errors), "batches": len(prep.plan.batches), "items_total": n_items,
            "items_skipped_resume": skipped, "items_run": len(sched.done) if sched else 0,
            "items_failed": len(failed_items), "maps_total": total_maps,
            "maps_run": stats.get("maps", 0), "rows_written_this_run": stats.get("rows", 0),
            "summary_rows": None if summary is None else int(len(summary)),
        },
        "forward_passes": stats.get("forward_passes", 0),
        "cache": {k: stats.get(k, 0) for k in ("cache_hits", "cache_transfers", "exports")},
        "reliability": {k: stats.get(k, 0) for k in ("item_retries", "reassigned", "duplicate_results",
                                                       "actor_restarts", "actors_replaced")},
        "failed_items": failed_items,
        "error": None if output_error is None else str(output_error),
        "timings": _timings(prep, ray_start, t_sweep, t_sum, sec,
                            prep.timings.get("prepare", 0) + time.perf_counter() - t_start),
        "peak_memory": {"driver_rss": peak_driver,
                        "actors": sched.actor_peaks if sched else {}},
        "profile_names": sched.profile_names if sched else {},
        "heatmaps": heatmaps,
    })
    if prep.resumed and prep.old_manifest:
        old_names = prep.old_manifest.get("profile_names", {})
        manifest["profile_names"] = {**old_names, **manifest["profile_names"]}
    try:
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))
    except OSError as exc:  # OUT still unwritable: the manifest of the run (status "running") stays
        if output_error is None:
            output_error = OutputError(exc, f"{out / 'manifest.json'}")
            manifest.update(status="output_error", error=str(output_error))
            exit_code = EXIT_OUTPUT
            log_fn(f"sweep stopped: {output_error}")
    _final_table(log_fn, prep, manifest, summary)
    return SweepResult(out, exit_code, manifest, prep.errors, failed_items)


def _timings(prep: Prepared, ray_start: float, sweep: float, summary: float, sec: dict[str, float],
             total: float) -> dict[str, float]:
    """Wall seconds of the phases, and where the sweep's time went (``manifest.json`` ``timings``).

    Driver wall seconds: ``discover``, ``model_load`` (config + weights, once on the driver; each actor's
    own build is its ``stats.load_seconds``), ``validate_images`` (every image decoded once), ``plan``,
    ``prepare`` (all of these), ``ray_start`` (connect or start Ray, cluster resources, the weights into the
    object store), ``sweep`` (actors started to last item), ``summary``, ``total``.
    Summed over this run's written work items: ``decode`` (image reads on the driver + resize/normalise on
    the actors), ``forward``, ``cache_import``, ``propagation`` (actor-seconds: with several actors they
    can add up to more than ``sweep``), ``writing`` (the driver's Parquet part writes) and
    ``result_tables`` (rows to Arrow on the actors).
    """
    out = {k: v for k, v in prep.timings.items()}
    out.update({
        "ray_start": ray_start, "sweep": sweep, "summary": summary,
        "decode": sec.get("read_images", 0.0) + sec.get("decode", 0.0),
        "forward": sec.get("forward", 0.0), "cache_import": sec.get("import", 0.0),
        "propagation": sec.get("relevance", 0.0), "result_tables": sec.get("table", 0.0),
        "writing": sec.get("writing", 0.0), "total": total,
    })
    return {k: round(float(v), 3) for k, v in out.items()}


def _render_heatmaps(prep: Prepared, log_fn: Callable[[str], None]) -> dict | None:
    """OUT/heatmaps: overlays of the top images per module/layer/feature (lrp_ray.viz)."""
    try:
        from lrp_ray.viz import write_top_heatmaps
    except ImportError as exc:
        log_fn(f"--heatmaps: the heatmap renderer is not available ({_one_line(exc)}); skipped")
        return None
    cfg = prep.model_cfg
    stride = 16 if getattr(cfg, "res5_dilation", 1) == 2 else 32
    t0 = time.perf_counter()
    try:
        size = (int(cfg.min_size_test), int(cfg.max_size_test))
        written = write_top_heatmaps(prep.out, prep.image_root, top_n=3, input_size=size, stride=stride)
    except Exception as exc:
        log_fn(f"--heatmaps: rendering failed: {_one_line(exc)}")
        return None
    log_fn(f"heatmaps: {len(written)} images in {prep.out / 'heatmaps'}")
    return {"dir": str(prep.out / "heatmaps"), "files": len(written),
            "seconds": round(time.perf_counter() - t0, 3)}


def _final_table(log_fn: Callable[[str], None], prep: Prepared, manifest: dict, summary: Any) -> None:
    c = manifest["counts"]
    cache = manifest["cache"]
    head = f"{'module':8} {'layer':>5} {'features':>8} {'maps':>10} {'input rel.':>11} {'activation':>11}"
    lines = ["", head]
    if summary is not None and len(summary):
        for m in ("encoder", "decoder"):
            for layer, g in summary[summary["module"] == m].groupby("layer", sort=True):
                rel, act = g["input_relevance_mean"].mean(), g["activation_mean"].mean()
                lines.append(f"{m:8} {int(layer):>5} {len(g):>8} {int(g['n_rows'].sum()):>10} "
                             f"{rel:>11.4g} {act:>11.4g}")
    failed = f" (see {prep.out / 'errors.csv'})" if c["images_failed"] else ""
    lines.append(f"status {manifest['status']}: {c['images_ok']} images ok, "
                 f"{c['images_failed']} failed{failed}")
    lines.append(f"{c['items_total']} work items: {c['items_skipped_resume']} resumed, {c['items_run']} run, "
                 f"{c['items_failed']} failed; {manifest['forward_passes']} forward passes, "
                 f"{cache['cache_hits']} cache hits, {cache['cache_transfers']} cache transfers; "
                 f"{manifest['timings']['total']:.1f}s")
    lines.append(f"results: {prep.out}")
    for line in lines:
        log_fn(line)


def run_sweep(spec: SweepSpec, *, log_fn: Callable[[str], None] = print, progress: bool | None = None,
              on_event: Callable[..., None] | None = None) -> SweepResult:
    """Validate (raises :class:`BadRequest`), then run. The in-process API behind the CLI."""
    prep = prepare(spec, log_fn)
    return execute(prep, log_fn=log_fn, progress=progress, on_event=on_event)
