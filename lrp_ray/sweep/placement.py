"""Placement: which work item an actor computes next (pure bookkeeping, no Ray; unit-tested alone).

Every image batch's forward cache should be computed once and reused by all its work items. An actor
asking for work takes, in order:

1. an item of a batch whose cache it holds (or is computing): a cache hit;
2. an item of an opened batch whose holders are all gone: it adopts the batch (recomputes its forward);
3. the first item of the next unopened batch, if its cache fits the actor's byte budget next to the
   caches it already holds (an actor holding nothing may always open one): a forward pass;
4. an item of a batch another actor holds, with at least two items left, if that cache fits: the holder
   exports the cache and this actor imports it (a cache transfer).

Failed attempts go back to the front of their batch's queue; a batch whose items are all done or failed
is closed, and its holders may drop the cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .plan import Batch, WorkItem

__all__ = ["Assignment", "Closed", "Placement"]


@dataclass(frozen=True)
class Assignment:
    """Run ``item`` on the asking actor; ``opens``: its batch's images must be shipped first;
    ``import_from``: the actor whose cache of the batch to import (None: use or compute our own)."""

    item: WorkItem
    batch: Batch
    opens: bool = False
    import_from: int | None = None


@dataclass(frozen=True)
class Closed:
    """A batch with nothing left to do, and the actors that may drop its cache."""

    batch: Batch
    actors: frozenset[int]


@dataclass
class _BatchSlot:
    batch: Batch
    pending: deque[WorkItem]
    remaining: int
    owner: int | None = None
    holders: set[int] = field(default_factory=set)
    ready: bool = False
    nbytes: int = 0

    def held_by(self, actor: int) -> bool:
        return actor in self.holders or self.owner == actor


class Placement:
    """Work items of a sweep over actors and cache holders, under a per-actor cache byte budget."""

    def __init__(self, batches: Iterable[Batch], items: Iterable[WorkItem], budget_bytes: int) -> None:
        by_batch: dict[int, list[WorkItem]] = {}
        for it in items:
            by_batch.setdefault(it.batch, []).append(it)
        batch_of = {b.index: b for b in batches}
        self._slots = {i: _BatchSlot(batch_of[i], deque(its), len(its))
                       for i, its in sorted(by_batch.items())}
        self._unopened = deque(sorted(self._slots))
        self._live: dict[int, _BatchSlot] = {}
        self._settled: set[str] = set()
        self.budget = int(budget_bytes)
        self.max_nbytes = 0
        self.remaining = sum(s.remaining for s in self._slots.values())

    # ------------------------------------------------------------------ questions
    def held_bytes(self, actor: int) -> int:
        """Bytes of live caches ``actor`` holds or is computing."""
        return sum(s.nbytes for s in self._live.values() if s.held_by(actor))

    def _fits(self, actor: int, extra: int) -> bool:
        holds = any(s.held_by(actor) for s in self._live.values())
        return not holds or self.held_bytes(actor) + extra <= self.budget

    def holders(self, batch: int) -> set[int]:
        slot = self._live.get(batch)
        return set() if slot is None else set(slot.holders)

    # ------------------------------------------------------------------ choosing
    def assign(self, actor: int) -> Assignment | None:
        """The next item for ``actor``, or None when nothing suits it now."""
        open_slots = [s for s in self._live.values() if s.pending]
        for s in open_slots:
            if s.held_by(actor):
                return Assignment(s.pending.popleft(), s.batch)
        for s in open_slots:
            if s.owner is None and not s.holders:
                s.owner = actor
                return Assignment(s.pending.popleft(), s.batch)
        while self._unopened:
            s = self._slots[self._unopened[0]]
            if not s.pending:
                self._unopened.popleft()
                continue
            if not self._fits(actor, self.max_nbytes):
                break
            self._unopened.popleft()
            s.owner = actor
            self._live[s.batch.index] = s
            return Assignment(s.pending.popleft(), s.batch, opens=True)
        best = None
        for s in open_slots:
            if s.ready and s.holders and actor not in s.holders and len(s.pending) >= 2 \
                    and self._fits(actor, s.nbytes) and (best is None or len(s.pending) > len(best.pending)):
                best = s
        if best is None:
            return None
        return Assignment(best.pending.popleft(), best.batch, import_from=min(best.holders))

    # ------------------------------------------------------------------ outcomes
    def completed(self, item: WorkItem, actor: int, cache_nbytes: int) -> Closed | None:
        """``item`` is done on ``actor``, which now holds its batch's cache of ``cache_nbytes``."""
        s = self._slots[item.batch]
        if not self._settle(item):
            return None
        s.ready = True
        s.holders.add(actor)
        s.nbytes = max(s.nbytes, int(cache_nbytes))
        self.max_nbytes = max(self.max_nbytes, s.nbytes)
        return self._close_if_done(s)

    def failed(self, item: WorkItem) -> Closed | None:
        """``item`` failed for good."""
        if not self._settle(item):
            return None
        return self._close_if_done(self._slots[item.batch])

    def retry(self, item: WorkItem) -> None:
        """Another attempt of ``item`` (first in its batch's queue)."""
        if item.uid not in self._settled:
            self._slots[item.batch].pending.appendleft(item)

    def forget(self, actor: int) -> None:
        """``actor`` lost its caches (restarted, gone or not answering)."""
        for s in self._live.values():
            s.holders.discard(actor)
            if s.owner == actor:
                s.owner = None

    def _settle(self, item: WorkItem) -> bool:
        if item.uid in self._settled:
            return False
        self._settled.add(item.uid)
        self.remaining -= 1
        self._slots[item.batch].remaining -= 1
        return True

    def _close_if_done(self, s: _BatchSlot) -> Closed | None:
        if s.remaining > 0:
            return None
        actors = frozenset(s.holders | ({s.owner} if s.owner is not None else set()))
        s.holders.clear()
        s.owner = None
        self._live.pop(s.batch.index, None)
        return Closed(s.batch, actors)
