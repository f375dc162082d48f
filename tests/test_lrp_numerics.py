"""Numbers depend on the request only: not on memory budgets, thread counts or other machine settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from lrp_ray.lrp import NUMERICS_VERSION, EngineConfig, LrpEngine
from tests.lrp_oracle import tiny_detr, token_inputs

SIZES = [(4, 5), (3, 3)]
D = 32
# (module, layer, features, queries): enough targets (>= hidden_dim / 4) that FFN maps are used
REQUESTS = [("encoder", 2, list(range(12)), None), ("encoder", 0, list(range(D)), None),
            ("decoder", 1, [0, 5, 9], "all"), ("decoder", 0, list(range(10)), "top2")]
ARRAYS = ("token_maps", "channel_relevance", "profile", "target_relevance", "bias_relevance",
          "pos_relevance", "softmax_relevance", "input_relevance")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs():
    return token_inputs(D, SIZES, dtype=torch.float32)


def _run(parts, threads: int, **cfg) -> tuple[dict, list]:
    """numerics() and every request's results of an engine built and run under ``threads`` threads."""
    with _threads(threads):
        eng = LrpEngine(parts, EngineConfig(device="cpu", **cfg))
        cache = eng.forward_tokens(*_inputs())
        results = [eng.relevance(cache, m, layer, f, q) for m, layer, f, q in REQUESTS]
        assert {k[0] for k in cache.derived} == {"enc", "dec"}  # the folded maps were used
        return eng.numerics(), results


def _assert_bitwise(a, b) -> None:
    for ra, rb in zip(a, b, strict=True):
        for name in ARRAYS:
            assert np.array_equal(getattr(ra, name), getattr(rb, name)), (ra.module, ra.layer, name)


@pytest.mark.parametrize("rules", ["cp", "attnlrp"])
def test_relevance_is_bitwise_independent_of_machine_settings(rules):
    """Legacy memory budgets (which used to size feature chunks), thread counts (which used to size the
    maps budget) and an explicit default maps budget all give bitwise-equal results and numerics."""
    parts = tiny_detr(dtype=torch.float32)
    num, ref = _run(parts, 1, rules=rules)
    for threads, cfg in [(2, {"memory_budget_bytes": 1}), (1, {"memory_budget_bytes": 1 << 42}),
                         (2, {"maps_budget_bytes": None}), (2, {"memory_budget_bytes": 12345})]:
        other_num, other = _run(parts, threads, rules=rules, **cfg)
        assert other_num == num, cfg
        _assert_bitwise(ref, other)


def test_default_chunking_is_a_function_of_the_request():
    """relevance() chunks by max_feature_chunk() under the fixed chunk budget, whatever the legacy
    memory budget: its default equals the explicit request with that chunk, bit for bit."""
    parts = tiny_detr(dtype=torch.float32)
    small = LrpEngine(parts, EngineConfig(device="cpu", memory_budget_bytes=1))
    big = LrpEngine(parts, EngineConfig(device="cpu", memory_budget_bytes=1 << 42))
    cache = small.forward_tokens(*_inputs())
    for module, r in (("encoder", 1), ("decoder", 6)):
        assert small.max_feature_chunk(cache, module, 1, r) == big.max_feature_chunk(cache, module, 1, r)
    fit = small.max_feature_chunk(cache, "encoder", 2)
    assert fit == D  # the nominal 1 GiB holds every feature of this tiny model
    default = small.relevance(cache, "encoder", 2, range(20))
    explicit = small.relevance(cache, "encoder", 2, range(20), chunk=fit)
    assert np.array_equal(default.token_maps, explicit.token_maps)
    # chunk sizes do change the last digits: an explicit chunk is part of the request
    ones = small.relevance(cache, "encoder", 2, range(20), chunk=1)
    assert not np.array_equal(ones.token_maps, default.token_maps)
    np.testing.assert_allclose(ones.token_maps, default.token_maps, rtol=1e-4, atol=1e-5)


def test_chunk_budget_is_a_request_constant():
    parts = tiny_detr(dtype=torch.float32)
    eng = LrpEngine(parts, EngineConfig(device="cpu"))
    tight = LrpEngine(parts, EngineConfig(device="cpu", chunk_budget_bytes=1))
    cache = eng.forward_tokens(*_inputs())
    assert tight.max_feature_chunk(cache, "encoder") == 1
    assert eng.max_feature_chunk(cache, "encoder", budget_bytes=1) == 1  # explicit budget still works
    assert tight.numerics()["chunk_budget_bytes"] == 1 != eng.numerics()["chunk_budget_bytes"]
    a = tight.relevance(cache, "encoder", 2, range(20))
    b = eng.relevance(cache, "encoder", 2, range(20), chunk=1)
    assert np.array_equal(a.token_maps, b.token_maps)
    with pytest.raises(ValueError, match="chunk_budget_bytes"):
        EngineConfig(chunk_budget_bytes=0)
    with pytest.raises(ValueError, match="chunk must be"):
        eng.relevance(cache, "encoder", 2, [0], chunk=-1)


def test_numerics_are_stable_json_constants():
    parts = tiny_detr(dtype=torch.float32)
    with _threads(1):
        one = LrpEngine(parts, EngineConfig(device="cpu", memory_budget_bytes=7)).numerics()
    with _threads(2):
        two = LrpEngine(parts, EngineConfig(device="cpu")).numerics()
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert one == {
        "numerics_version": NUMERICS_VERSION, "rules": "cp",
        "rule_ops": {"layer_norm": "epsilon_constant_std", "linear": "epsilon",
                     "ffn_activation": "relu_pass_active", "positional_sum": "epsilon_share",
                     "value_product": "probs_constant", "softmax": "constant", "logit_product": "uniform"},
        "epsilon": 1e-6, "precision": "fp32", "forward_precision": "fp32", "chunk_budget_bytes": 1 << 30,
        "maps_budget_bytes": 4 << 30, "maps_min_targets": D // 4, "ffn_maps": True, "compile": False,
    }
    for change, key in [({"precision": "bf16"}, "precision"), ({"rules": "attnlrp"}, "rules"),
                        ({"epsilon": 0.0}, "epsilon"), ({"maps_budget_bytes": 1}, "maps_budget_bytes"),
                        ({"ffn_maps": False}, "ffn_maps"),
                        ({"precision": "bf16", "forward_precision": "bf16"}, "forward_precision")]:
        other = LrpEngine(parts, EngineConfig(device="cpu", **change)).numerics()
        assert other[key] != one[key], change
    half = LrpEngine(parts, EngineConfig(device="cpu", precision="bf16")).numerics()
    assert half["forward_precision"] == "fp32"


def test_maps_choice_uses_fixed_constants():
    """Maps threshold hidden_dim // 4 and the maps budget from the config, not from RAM or threads."""
    parts = tiny_detr(dtype=torch.float32)
    for threads in (1, 2):
        with _threads(threads):
            eng = LrpEngine(parts, EngineConfig(device="cpu"))
        assert eng.maps_min_targets == D // 4
        assert eng.maps_budget == 4 << 30
    cache = eng.forward_tokens(*_inputs())
    eng.relevance(cache, "encoder", 1, range(D // 4 - 1))
    assert not cache.derived
    eng.relevance(cache, "encoder", 1, range(D // 4))
    assert {k[:2] for k in cache.derived} == {("enc", 0), ("enc", 1)}


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: "
                                                             "you tried to allocate 1 GB; out of memory")])
def test_out_of_memory_propagates_without_retry(exc):
    """The engine never retries smaller chunks: the caller (the sweep) decides what an OOM means."""
    parts = tiny_detr(dtype=torch.float32)
    eng = LrpEngine(parts, EngineConfig(device="cpu"))
    cache = eng.forward_tokens(*_inputs())
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise exc

    eng._propagate = boom
    with pytest.raises(type(exc)):
        eng.relevance(cache, "encoder", 2, range(20), chunk=4)
    assert len(calls) == 1
