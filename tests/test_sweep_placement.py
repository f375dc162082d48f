"""Placement without Ray: cache hits first, one forward per batch, budgets, transfers, retries, losses."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lrp_ray.sweep.placement import Placement
from lrp_ray.sweep.plan import make_plan


def plan(n_images=6, batch_size=2, features=4, chunk=2, layers=(0, 1)):
    return make_plan([f"img{i}.png" for i in range(n_images)], batch_size, {"encoder": list(layers)},
                     list(range(features)), chunk, {"encoder": 1})


def test_an_actor_finishes_its_batch_before_opening_the_next():
    p = plan()
    pl = Placement(p.batches, p.items, budget_bytes=10)
    first = pl.assign(0)
    assert first.opens and first.batch.index == 0 and first.import_from is None
    pl.completed(first.item, 0, cache_nbytes=100)
    seen = [first.item.uid]
    while True:
        a = pl.assign(0)
        if a is None or a.batch.index != 0:
            break
        assert not a.opens
        seen.append(a.item.uid)
        pl.completed(a.item, 0, 100)
    assert sorted(seen) == sorted(it.uid for it in p.by_batch[0])
    assert a is not None and a.opens and a.batch.index == 1  # batch 0 closed: the next one opens


def test_budget_stops_an_actor_from_opening_a_second_cache_and_another_actor_takes_it():
    p = plan()
    pl = Placement(p.batches, p.items, budget_bytes=150)
    a0 = pl.assign(0)
    closed = pl.completed(a0.item, 0, cache_nbytes=100)
    assert closed is None
    hit = pl.assign(0)  # a cache hit, not a new batch
    assert hit.batch.index == 0 and not hit.opens
    # actor 0 holds 100 bytes: a second 100-byte cache would exceed 150; actor 1 holds nothing and opens
    pl2 = Placement(p.batches, p.items, budget_bytes=150)
    x = pl2.assign(0)
    pl2.completed(x.item, 0, 100)
    for _ in range(len(p.by_batch[0]) - 1):
        pl2.assign(0)  # queue batch 0's remaining items on actor 0 (not completed yet)
    assert pl2.assign(0) is None
    y = pl2.assign(1)
    assert y.opens and y.batch.index == 1


def test_a_waiting_actor_imports_a_ready_cache_from_its_holder():
    p = plan(n_images=2, features=8, chunk=1, layers=(0,))
    pl = Placement(p.batches, p.items, budget_bytes=1 << 30)
    a = pl.assign(0)
    assert pl.assign(1) is None  # the only batch is being computed by actor 0 (not ready)
    pl.completed(a.item, 0, 100)
    t = pl.assign(1)
    assert t.import_from == 0 and t.batch.index == 0 and not t.opens


def test_lost_holder_lets_another_actor_adopt_the_batch_and_retries_come_first():
    p = plan(n_images=2, layers=(0,))
    pl = Placement(p.batches, p.items, budget_bytes=1 << 30)
    a = pl.assign(0)
    pl.forget(0)  # actor 0 died before finishing: its item comes back first
    pl.retry(a.item)
    b = pl.assign(1)
    assert b.item == a.item and not b.opens and b.import_from is None  # adopts (recomputes the forward)


def test_every_item_is_settled_once_and_batches_close_with_their_holders():
    p = plan()
    pl = Placement(p.batches, p.items, budget_bytes=1 << 30)
    closed = []
    done = set()
    actor = 0
    while pl.remaining:
        a = pl.assign(actor)
        assert a is not None
        c = pl.completed(a.item, actor, 10)
        assert pl.completed(a.item, actor, 10) is None  # a duplicate result changes nothing
        done.add(a.item.uid)
        if c:
            closed.append(c)
        actor = 1 - actor
    assert done == {it.uid for it in p.items}
    assert [c.batch.index for c in closed] == [0, 1, 2]
    assert all(c.actors for c in closed)


@settings(max_examples=60, deadline=None)
@given(n_images=st.integers(1, 7), batch_size=st.integers(1, 3), features=st.integers(1, 5),
       chunk=st.integers(1, 3), actors=st.integers(1, 3), budget=st.integers(1, 400),
       events=st.lists(st.integers(0, 9), max_size=40))
def test_any_interleaving_of_actors_losses_and_retries_settles_each_item_exactly_once(
        n_images, batch_size, features, chunk, actors, budget, events):
    p = plan(n_images, batch_size, features, chunk)
    pl = Placement(p.batches, p.items, budget_bytes=budget)
    queued: dict[int, list] = {a: [] for a in range(actors)}
    settled: list[str] = []
    ev = iter(events)
    for _ in range(10_000):
        if not pl.remaining:
            break
        for a in range(actors):
            x = pl.assign(a)
            if x is not None:
                queued[a].append(x.item)
        e = next(ev, 0)
        busy = [x for x in range(actors) if queued[x]]
        a = min(busy, key=lambda x: (x - e) % actors) if busy else e % actors
        if e == 9 and queued[a]:  # the actor is lost: its caches are gone and its items come back
            pl.forget(a)
            for it in queued[a]:
                pl.retry(it)
            queued[a] = []
        elif queued[a]:
            it = queued[a].pop(0)
            pl.completed(it, a, 50)
            settled.append(it.uid)
        elif not any(queued.values()):
            raise AssertionError("no actor got work while items remain")
    assert pl.remaining == 0
    assert sorted(settled) == sorted(it.uid for it in p.items)


def test_progress_shows_an_eta_only_once_it_is_measured():
    from lrp_ray.sweep.progress import TextProgress

    lines: list[str] = []
    p = TextProgress(total=100, initial=0, log_fn=lines.append, every=0.0)
    p.update(10)  # the first item: start-up time is not a rate
    assert lines[-1].endswith("ETA ?") and "0.0 maps/s" in lines[-1]
    p.first = (p.first[0] - 2.0, p.first[1])  # 2 s since the first item
    p.update(20)
    assert "ETA 00:00:0" in lines[-1] and "10.0 maps/s" in lines[-1]
