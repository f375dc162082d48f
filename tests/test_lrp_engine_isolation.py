"""The engine works on its own copy of the model: the caller's model is never modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lrp_ray.lrp import EngineConfig, LrpEngine
from lrp_ray.models import build_model, load_config, preprocess
from tests.conftest import TINY_OVERRIDES
from tests.lrp_oracle import tiny_detr, token_inputs


class Wrapper(nn.Module):
    """A user's module tree with the DETR inside (as detectron2 wraps it)."""

    def __init__(self, detr: nn.Module) -> None:
        super().__init__()
        self.detr = detr
        self.extra = nn.Linear(3, 3)


def _tiny_model() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    cfg = load_config(None, TINY_OVERRIDES)
    return build_model(cfg), cfg


def _images(cfg):
    rng = np.random.default_rng(0)
    return preprocess([rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)], cfg)


def _snapshot(model: nn.Module) -> dict:
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "tensors": {k: (v.device, v.dtype, v.data_ptr(), v.detach().clone())
                    for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (dev, dt, ptr, val) in before["tensors"].items():
        dev2, dt2, ptr2, val2 = after["tensors"][k]
        assert (dev2, dt2, ptr2) == (dev, dt, ptr), k
        assert torch.equal(val2, val), k


@pytest.mark.parametrize("wrap", [False, True])
def test_engine_does_not_mutate_the_callers_model(wrap):
    model, cfg = _tiny_model()
    model.train()  # the user's mode: BatchNorm in training mode, dropout on
    user = Wrapper(model) if wrap else model
    before = _snapshot(user)
    eng = LrpEngine(user, EngineConfig(device="cpu", precision="fp64"))
    cache = eng.forward(_images(cfg))
    eng.relevance(cache, "decoder", 1, [0, 1], "top2")
    _assert_unchanged(user, before)
    assert user.training and model.training
    assert not eng.parts.module.training and eng.parts.module is not model
    assert eng.parts.module.cfg == model.cfg  # attributes travel along (api.engine reads cfg)


def test_engine_results_do_not_follow_later_changes_to_the_model():
    """The engine's copy is independent: editing the caller's model afterwards changes nothing."""
    model, cfg = _tiny_model()
    eng = LrpEngine(model, EngineConfig(device="cpu"))
    batch = _images(cfg)
    ref = eng.relevance(eng.forward(batch), "encoder", 1, [0, 3])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.train()
    again = eng.relevance(eng.forward(batch), "encoder", 1, [0, 3])
    assert np.array_equal(ref.token_maps, again.token_maps)


def test_bare_parts_keep_their_modules():
    parts = tiny_detr(dtype=torch.float64)
    parts.transformer.train()
    before = _snapshot(parts.transformer)
    heads = _snapshot(parts.class_embed)
    eng = LrpEngine(parts, EngineConfig(device="cpu", precision="fp32"))
    eng.relevance(eng.forward_tokens(*token_inputs(32, [(3, 4)])), "encoder", 1, [2])
    _assert_unchanged(parts.transformer, before)
    _assert_unchanged(parts.class_embed, heads)
    assert parts.transformer.training and not eng.parts.transformer.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_leaves_the_model_on_its_device():
    model, cfg = _tiny_model()
    before = _snapshot(model)
    eng = LrpEngine(model, EngineConfig(device="cuda"))
    eng.relevance(eng.forward(_images(cfg)), "encoder", 0, [1])
    _assert_unchanged(model, before)
    assert next(eng.parts.module.parameters()).device.type == "cuda"
