"""Results are a function of the request, never of the run: the bundled demo sweep gives bitwise equal
relevance with a tiny or a large cache budget, one or two actors, and when interrupted and resumed."""

from __future__ import annotations

import pytest

from lrp_ray.sweep import BadRequest, SweepSpec, run_sweep

from .conftest import assert_rows_equal, load_rows


def demo_spec(out, **kw) -> SweepSpec:
    """The bundled demo model and images; every feature of layer 1 (enough targets per call that the
    engine folds FFN blocks into per-token maps, where a budget-dependent chunking would show)."""
    base = dict(out=str(out), module="both", layers="1", features="all", queries="top2", batch_size=3,
                device="cpu", ping_timeout_s=30)
    return SweepSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("identity") / "large_budget_one_actor"
    res = run_sweep(demo_spec(out, actors=1, cache_budget_mb=8192), log_fn=lambda s: None, progress=False)
    assert res.exit_code == 0 and res.manifest["status"] == "complete"
    return out, res


def test_tiny_budget_and_two_actors_give_bitwise_equal_relevance(reference, tmp_path):
    ref, ref_res = reference
    out = tmp_path / "tiny_budget_two_actors"
    res = run_sweep(demo_spec(out, actors=2, cache_budget_mb=1, max_in_flight=1), log_fn=lambda s: None,
                    progress=False)
    assert res.exit_code == 0
    assert res.manifest["run"]["actors"] == 2
    assert res.manifest["spec_hash"] == ref_res.manifest["spec_hash"]  # run settings are not in the hash
    assert_rows_equal(load_rows(out), load_rows(ref))


def test_interrupted_and_resumed_with_other_run_settings_gives_bitwise_equal_relevance(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "interrupted"
    seen = []

    def stop_after_two(kind, **info):
        if kind == "item_done":
            seen.append(info["uid"])
            if len(seen) == 2:
                raise KeyboardInterrupt

    first = run_sweep(demo_spec(out, actors=2, cache_budget_mb=64), log_fn=lambda s: None, progress=False,
                      on_event=stop_after_two)
    assert first.exit_code == 130 and first.manifest["status"] == "interrupted"
    resumed = run_sweep(demo_spec(out, actors=1, cache_budget_mb=1, max_in_flight=1), log_fn=lambda s: None,
                        progress=False)
    assert resumed.exit_code == 0
    assert resumed.manifest["counts"]["items_skipped_resume"] >= 2
    assert_rows_equal(load_rows(out), load_rows(ref))


def test_resuming_with_a_different_request_is_refused_naming_what_differs(reference):
    ref, _ = reference
    with pytest.raises(BadRequest, match=r"differs in: .*epsilon"):
        run_sweep(demo_spec(ref, epsilon=1e-3), log_fn=lambda s: None, progress=False)
    with pytest.raises(BadRequest, match=r"differs in: .*batch_size"):
        run_sweep(demo_spec(ref, batch_size=2), log_fn=lambda s: None, progress=False)
