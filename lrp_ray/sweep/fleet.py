"""Fleet: the sweep's Ray actors. Starts them, submits work, pings them (a concurrency group of their own
answers while they compute), notices restarts and lost actors, starts replacements, and judges each failed
attempt by its exception type: an application error, or a system failure (worker or node lost, out of
memory) with its own retry budget (:class:`RetryPolicy`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ItemOutOfMemory, one_line
from .spec import RunSpec

__all__ = ["RetryPolicy", "Outcome", "Fleet"]


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per work item, actor replacements and the ping timeout (from the run's settings)."""

    max_item_retries: int = 3
    max_system_retries: int = 10
    max_replacements: int = 2
    ping_timeout_s: float = 60.0
    startup_timeout_s: float = 600.0
    """How long a new actor may stay silent (model shipping, CUDA init, a GPU node booting)."""

    @classmethod
    def from_run(cls, run: RunSpec, n_actors: int) -> RetryPolicy:
        return cls(run.max_item_retries, run.max_system_retries, max(2, 2 * n_actors), run.ping_timeout_s,
                   run.start_timeout_s)


@dataclass(frozen=True)
class Outcome:
    """One finished attempt: ``kind`` is ``ok``, ``error`` (application) or ``system``."""

    actor: int
    uid: str
    kind: str
    payload: dict | None = None
    reason: str = ""


@dataclass
class _Actor:
    idx: int
    handle: Any
    queued: dict[Any, str] = field(default_factory=dict)
    available: bool = True
    dead: bool = False
    started: bool = False
    pid: int | None = None
    ping_ref: Any = None
    ping_sent: float = 0.0


class Fleet:
    """Actors of one sweep. ``poll`` returns finished attempts, and the actors whose caches are gone
    (restarted, replaced or silent) with the work items they had queued."""

    def __init__(self, actor_cls: Any, options: dict, args: tuple, model_box: list, policy: RetryPolicy,
                 log: Callable[[str], None], on_event: Callable[..., None] | None = None) -> None:
        import ray

        self.ray = ray
        self._cls, self._opts, self._args = actor_cls, options, args
        self._model_box = model_box  # the weights' object ref, sent with every item (see LrpWorker)
        self.policy = policy
        self.log = log
        self.on_event = on_event or (lambda *a, **k: None)
        self.actors: list[_Actor] = []
        self.stats = {"actor_restarts": 0, "actors_replaced": 0, "reassigned": 0}
        self.last_death = ""
        self._lost: list[tuple[int, list[str]]] = []
        self._drops: deque[Any] = deque(maxlen=64)
        self._t_nodes = time.monotonic()
        self._node_lost = False
        self._nodes = self._alive_nodes()

    # ------------------------------------------------------------------ lifecycle
    def start(self, n: int) -> None:
        for _ in range(n):
            self._new_actor()
        self.on_event("actors_started", handles=[a.handle for a in self.actors])

    def _new_actor(self) -> _Actor:
        a = _Actor(len(self.actors), self._cls.options(**self._opts).remote(*self._args))
        self.actors.append(a)
        return a

    def stop(self) -> None:
        if self._drops:
            try:
                self.ray.wait(list(self._drops), num_returns=len(self._drops), timeout=5)
            except Exception:
                pass
        for a in self.actors:
            try:
                self.ray.kill(a.handle, no_restart=True)
            except Exception:
                pass

    @property
    def alive(self) -> bool:
        return any(not a.dead for a in self.actors)

    def ready(self, slot: int) -> list[int]:
        """Actors that can take another item with fewer than ``slot + 1`` queued."""
        return [a.idx for a in self.actors if a.available and not a.dead and len(a.queued) <= slot]

    def any_available(self) -> bool:
        return any(a.available and not a.dead for a in self.actors)

    @property
    def started_any(self) -> bool:
        """Whether any actor has answered yet (it has a process, so its resources were found)."""
        return any(a.started for a in self.actors)

    def shortfall(self) -> str:
        """What an actor asks of the cluster and what the cluster has (for a sweep no actor could join)."""
        need = f"{self._opts.get('num_cpus', 0):g} CPU(s)"
        if self._opts.get("num_gpus"):
            need += f" and {self._opts['num_gpus']:g} GPU(s)"
        try:
            res = self.ray.cluster_resources()
            have = f"{res.get('CPU', 0):g} CPU(s) and {res.get('GPU', 0):g} GPU(s)"
        except Exception:
            have = "unknown resources"
        return f"each actor asks for {need}; the cluster has {have} in all"

    # ------------------------------------------------------------------ work
    def submit(self, idx: int, uid: str, *args: Any) -> None:
        a = self.actors[idx]
        a.queued[a.handle.run_item.remote(self._model_box, *args)] = uid

    def export(self, idx: int, key: str) -> Any:
        return self.actors[idx].handle.export_cache.remote(key)

    def drop(self, actors: frozenset[int], key: str) -> None:
        for idx in actors:
            a = self.actors[idx]
            if a.available and not a.dead:
                self._drops.append(a.handle.drop.remote([key]))

    def poll(self, timeout: float = 1.0) -> tuple[list[Outcome], list[tuple[int, list[str]]]]:
        """Wait up to ``timeout`` for results and pings; then check health."""
        owner = {ref: a for a in self.actors for ref in a.queued}
        pings = {a.ping_ref: a for a in self.actors if a.ping_ref is not None and not a.dead}
        refs = list(owner) + list(pings)
        outcomes: list[Outcome] = []
        if refs:
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                more, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                ready = list(dict.fromkeys(ready + more))
            for ref in ready:
                if ref in owner and ref in owner[ref].queued:
                    outcomes.append(self._result(owner[ref], ref))
                elif ref in pings:
                    self._on_ping(pings[ref])
        else:
            time.sleep(min(timeout, 0.2))
        self._health(time.monotonic())
        lost, self._lost = self._lost, []
        return outcomes, lost

    def _result(self, a: _Actor, ref: Any) -> Outcome:
        uid = a.queued.pop(ref)
        ex = self.ray.exceptions
        try:
            payload = self.ray.get(ref, timeout=600)
        except ex.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            reason = f"{type(cause).__name__}: {one_line(cause, 300)}"
            if isinstance(cause, ItemOutOfMemory):
                self._caches_lost(a)
                return Outcome(a.idx, uid, "system", reason=reason)
            return Outcome(a.idx, uid, "error", reason=reason)
        except ex.ActorDiedError as exc:
            self._mark_dead(a, one_line(exc, 400))
            return Outcome(a.idx, uid, "system", reason=one_line(exc, 200))
        except ex.RayError as exc:  # lost object, crashed worker, lost node, Ray's memory monitor, timeout
            self._caches_lost(a)
            return Outcome(a.idx, uid, "system", reason=one_line(exc, 200))
        self._seen_pid(a, payload["pid"])
        return Outcome(a.idx, uid, "ok", payload)

    # ------------------------------------------------------------------ health
    def _caches_lost(self, a: _Actor, uids: list[str] | None = None) -> None:
        self._lost.append((a.idx, uids or []))

    def _mark_unavailable(self, a: _Actor, why: str) -> None:
        if a.available:
            self.log(f"actor {a.idx} unavailable ({why}); moving its {len(a.queued)} queued item(s)")
        a.available = False
        uids = list(a.queued.values())
        self.stats["reassigned"] += len(uids)
        a.queued.clear()
        self._caches_lost(a, uids)

    def _mark_dead(self, a: _Actor, why: str) -> None:
        if a.dead:
            return
        self._mark_unavailable(a, why)
        a.dead = True
        a.ping_ref = None
        self.last_death = why
        if self.stats["actors_replaced"] < self.policy.max_replacements:
            self.stats["actors_replaced"] += 1
            new = self._new_actor()
            self.log(f"actor {a.idx} is gone ({why}); started actor {new.idx} in its place")

    def _seen_pid(self, a: _Actor, pid: int) -> None:
        if a.pid is not None and pid != a.pid:
            self.stats["actor_restarts"] += 1
            self._caches_lost(a)
            self.log(f"actor {a.idx} restarted (its forward caches are gone)")
        a.pid = pid
        a.started = True

    def _alive_nodes(self) -> set[str]:
        try:
            return {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        except Exception:
            return set()

    def _health(self, now: float) -> None:
        """Ping every actor; move work off silent ones; notice nodes leaving the cluster."""
        if now - self._t_nodes >= 5.0:
            self._t_nodes = now
            alive = self._alive_nodes()
            if alive and self._nodes - alive:
                self._node_lost = True
                self.log(f"{len(self._nodes - alive)} node(s) left the cluster")
            self._nodes = alive or self._nodes
        timeout = float(self.policy.ping_timeout_s)
        for a in self.actors:
            if a.dead:
                continue
            if a.ping_ref is None:
                if now - a.ping_sent >= min(5.0, timeout / 2):
                    a.ping_ref = a.handle.ping.remote()
                    a.ping_sent = now
                continue
            limit = timeout if (a.started or self._node_lost) else self.policy.startup_timeout_s
            if a.available and now - a.ping_sent > limit:
                self._mark_unavailable(a, f"no answer for {now - a.ping_sent:.0f}s")

    def _on_ping(self, a: _Actor) -> None:
        ref, a.ping_ref = a.ping_ref, None
        try:
            info = self.ray.get(ref, timeout=60)
        except self.ray.exceptions.ActorDiedError as exc:
            self._mark_dead(a, one_line(exc, 400))
            return
        except Exception as exc:  # restarting / unavailable: ask again later
            self._mark_unavailable(a, one_line(exc, 120))
            return
        self._seen_pid(a, info["pid"])
        if not a.available:
            a.available = True
            self.log(f"actor {a.idx} is back")

    def final_info(self) -> list[dict]:
        """Each live actor's pid, node, device, counters and memory peaks (for the manifest)."""
        out = []
        live = [a for a in self.actors if not a.dead and a.available and a.started]
        refs = {a.idx: a.handle.ping.remote() for a in live}
        for idx, ref in refs.items():
            try:
                info = self.ray.get(ref, timeout=10)
                keys = ("pid", "node", "device", "stats", "peak_rss", "peak_device")
                out.append({"actor": idx, **{k: info[k] for k in keys}})
            except Exception:
                out.append({"actor": idx, "error": "no answer"})
        return out
