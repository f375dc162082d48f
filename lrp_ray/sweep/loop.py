"""The sweep loop: asks :class:`Placement` what each actor computes next, hands it to the :class:`Fleet`,
commits finished items through the :class:`ResultSink`, and applies the retry policy to failures."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from . import interrupts
from .errors import SweepFailed, one_line
from .fleet import Fleet, Outcome
from .images import ImageError
from .placement import Assignment, Closed, Placement
from .plan import WorkItem
from .preparation import Prepared
from .sink import ResultSink, without_images

__all__ = ["SweepLoop"]

SECONDS = ("read_images", "decode", "forward", "import", "relevance", "table")


class SweepLoop:
    """Runs ``todo`` to completion (or failure) on ``fleet``."""

    def __init__(self, prep: Prepared, todo: list[WorkItem], fleet: Fleet, sink: ResultSink,
                 log: Callable[[str], None], bar: Any = None,
                 on_event: Callable[..., None] | None = None) -> None:
        self.prep, self.fleet, self.sink, self.log, self.bar = prep, fleet, sink, log, bar
        self.on_event = on_event or (lambda *a, **k: None)
        self.policy = fleet.policy
        self.placement = Placement(prep.plan.batches, todo, int(prep.run.cache_budget_mb) << 20)
        self.items = {it.uid: it for it in todo}
        self.n_batches = len(prep.plan.batches)
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.attempts: Counter[str] = Counter()
        self.system_attempts: Counter[str] = Counter()
        self.images: dict[int, Any] = {}
        self.digests = {i.name: i.sha1 for i in prep.images}
        self.infos = {i.name: i for i in prep.images}
        self.exports: dict[int, tuple[int, Any]] = {}
        self.stats = Counter({k: 0 for k in ("forward_passes", "cache_hits", "cache_transfers", "exports",
                                             "item_retries", "maps", "detections")})
        self.seconds = dict.fromkeys(SECONDS, 0.0)
        self.profile_names: dict[str, list[str]] = {}
        self.actor_peaks: dict[str, dict] = {}

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        stall_limit = max(600.0, 10 * float(self.policy.ping_timeout_s))
        t_progress = t_start = time.monotonic()
        while self.placement.remaining > 0:
            interrupts.check()
            if not self.fleet.started_any and time.monotonic() - t_start > self.policy.startup_timeout_s:
                raise SweepFailed(f"no actor started within {self.policy.startup_timeout_s:.0f}s: "
                                  f"{self.fleet.shortfall()} (start_timeout_s)")
            self._fill()
            if not self.fleet.alive:
                raise SweepFailed(f"no worker actors left (last error: {self.fleet.last_death})")
            outcomes, lost = self.fleet.poll(1.0)
            for idx, uids in lost:
                self._forget(idx)
                for uid in uids:
                    self.placement.retry(self.items[uid])
            for o in outcomes:
                self._on_outcome(o)
            if outcomes:
                t_progress = time.monotonic()
            elif time.monotonic() - t_progress > stall_limit and not self.fleet.any_available():
                idle = time.monotonic() - t_progress
                raise SweepFailed(f"no progress for {idle:.0f}s and no actor answers")

    def _fill(self) -> None:
        for slot in range(self.prep.run.max_in_flight):
            for idx in self.fleet.ready(slot):
                a = self.placement.assign(idx)
                if a is not None:
                    self._submit(idx, a)

    def _submit(self, idx: int, a: Assignment) -> None:
        b = a.batch
        if a.opens and not self._open(a):
            return
        cache_box = None
        if a.import_from is not None:
            if b.index not in self.exports:
                self.exports[b.index] = (a.import_from, self.fleet.export(a.import_from, b.key))
                self.stats["exports"] += 1
            cache_box = [self.exports[b.index][1]]
        it = a.item
        item = {"uid": it.uid, "kind": it.kind, "batch_key": b.key, "module": it.module, "layer": it.layer,
                "features": list(it.features), "queries": self.prep.result.queries,
                "targets_per_feature": it.targets_per_feature, "datasets": list(it.datasets)}
        if it.kind == "detections":
            item.update(self.prep.result.detections or {}, layers=self.prep.result.layers)
        elif it.kind == "pixels":
            px = self.prep.result.pixels or {}
            item.update(picks=[list(p) for p in it.picks], composite=px["composite"]["pixel_name"],
                        max_side=px["max_side"])
        self.fleet.submit(idx, it.uid, item, list(b.images), [self.images[b.index]], cache_box)

    def _open(self, a: Assignment) -> bool:
        """Ship the batch's images (read on the driver) into the object store.

        An image that changed or vanished since it was checked cannot be explained as asked (its digest is
        part of the request): it is recorded in errors.csv with the reason, and a blank stand-in of its
        checked size takes its place, so its batch mates are computed on the same padded batch as planned
        (their rows are bitwise those of the plan; an image's rows never depend on another image's
        content) and the stand-in's rows are dropped."""
        from lrp_ray.models import read_image
        from lrp_ray.results import image_path

        t0 = time.perf_counter()
        images, lost = [], {}
        for name in a.batch.images:
            try:
                images.append(self._read_checked(name, read_image, image_path))
            except Exception as exc:  # changed or vanished since it was validated
                info = self.infos[name]
                images.append(np.zeros((info.height, info.width, 3), np.uint8))
                lost[name] = ("changed or vanished since it was checked: "
                              f"{getattr(exc, 'reason', None) or one_line(exc, 200)}")
        if lost:
            for name, reason in lost.items():
                if name not in self.sink.lost_names:
                    self.log(f"image {name}: {reason}; its batch mates are computed without it")
            self.sink.add_lost(a.batch.index, [ImageError(n, r) for n, r in lost.items()])
        self.seconds["read_images"] += time.perf_counter() - t0
        self.images[a.batch.index] = self.fleet.ray.put(images)
        return True

    def _read_checked(self, name: str, read_image: Any, image_path: Any) -> Any:
        """The image, if its content is still what was checked (its digest is part of the request)."""
        import hashlib

        path = image_path(self.prep.image_root, name)
        before = hashlib.sha1(path.read_bytes()).hexdigest()
        arr = read_image(path)
        if before != self.digests[name] or hashlib.sha1(path.read_bytes()).hexdigest() != before:
            raise ValueError("its content changed since it was checked")
        return arr

    # ------------------------------------------------------------------ outcomes
    def _on_outcome(self, o: Outcome) -> None:
        it = self.items[o.uid]
        if o.kind == "ok":
            self._on_rows(o.actor, it, o.payload or {})
            return
        if o.kind == "error":
            self.attempts[o.uid] += 1
            give_up = self.attempts[o.uid] >= self.policy.max_item_retries
        else:
            self.system_attempts[o.uid] += 1
            give_up = self.system_attempts[o.uid] >= self.policy.max_system_retries
        if give_up:
            what = "" if o.kind == "error" else "gave up after repeated worker failures: "
            self._fail(it, what + o.reason)
            self._closed(self.placement.failed(it))
        else:
            self.stats["item_retries"] += 1
            if o.kind == "error":
                self.log(f"retrying {it.label(self.n_batches)} after error: {o.reason}")
            self.placement.retry(it)

    def _on_rows(self, actor: int, it: WorkItem, payload: dict) -> None:
        tables = payload["tables"]
        if it.batch in self.sink.lost:
            tables = without_images(tables, self.sink.lost[it.batch])
        if it.uid in self.done or it.uid in self.failed or not self.sink.commit(it, tables):
            return
        for k, v in (payload.get("timings") or {}).items():
            if k in self.seconds:
                self.seconds[k] += float(v)
        self.done.add(it.uid)
        src = payload["source"]
        self.stats["forward_passes"] += int(src == "forward")
        self.stats["cache_hits"] += int(src == "local")
        self.stats["cache_transfers"] += int(src == "import")
        self.stats["maps"] += it.n_maps
        if payload.get("profile_names"):
            self.profile_names.setdefault(f"{it.module}/{it.layer}", payload["profile_names"])
        self.stats["detections"] += int(payload.get("detections", 0))
        self.actor_peaks[str(actor)] = {k: payload[k] for k in ("peak_rss", "peak_device")}
        self.log(f"{it.label(self.n_batches)} {payload['seconds']:.2f}s [{src}, actor {actor}]")
        if self.bar is not None:
            self.bar.update(it.n_maps)
        self.on_event("item_done", uid=it.uid, done=len(self.done), total=len(self.items), actor=actor)
        self._closed(self.placement.completed(it, actor, int(payload.get("footprint", 0))))

    def _fail(self, it: WorkItem, reason: str) -> None:
        if it.uid not in self.failed and it.uid not in self.done:
            self.failed[it.uid] = reason
            self.log(f"FAILED {it.label(self.n_batches)}: {reason}")

    def _closed(self, closed: Closed | None) -> None:
        if closed is None:
            return
        self.fleet.drop(closed.actors, closed.batch.key)
        self.images.pop(closed.batch.index, None)
        self.exports.pop(closed.batch.index, None)

    def _forget(self, actor: int) -> None:
        self.placement.forget(actor)
        for b, (exporter, _) in list(self.exports.items()):
            if exporter == actor:
                del self.exports[b]
