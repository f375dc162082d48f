"""Detection targets, concept relevance and conditional heatmaps against a float64 autograd oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrp_ray.lrp import EngineConfig, LrpEngine
from lrp_ray.lrp.concepts import (
    MEMORY_BYPASS,
    OTHER_QUERIES,
    conditional_maps,
    detection_relevance,
    top_channels,
)
from lrp_ray.lrp.detections import parse_selection, select_detections
from tests.lrp_oracle import _ln, oracle_forward, tiny_detr, token_inputs

SIZES = [(4, 5), (3, 3)]  # second image padded inside the batch
LAYERS = {"encoder": [0, 1, 2], "decoder": [0, 1]}
D = 32


def _flat(src, pos, mask):
    return (src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1))


def _engine(parts, rules="cp", eps=0.0, precision="fp64", **kw):
    return LrpEngine(parts, EngineConfig(rules=rules, epsilon=eps, precision=precision, device="cpu", **kw))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _setup(pre_norm=False, rules="cp", eps=0.0, decoder_norm=True, selection="top2"):
    parts = tiny_detr(pre_norm=pre_norm)
    if not decoder_norm:
        parts.transformer.decoder.norm = None
    src, pos, mask = token_inputs(D, SIZES)
    eng = _engine(parts, rules=rules, eps=eps)
    cache = eng.forward_tokens(src, pos, mask)
    dets = select_detections(cache, selection)
    return parts, (src, pos, mask), eng, cache, dets


class Oracle:
    """Gradient x input of the rule-modified float64 model (tests/lrp_oracle.py), started at the class
    logit of one detection per image; conditioning = the layer's gradient masked, then pulled back."""

    def __init__(self, parts, src, pos, mask, rules: str, query: np.ndarray, cls: np.ndarray) -> None:
        x0, p, kpm = _flat(src, pos, mask)
        self.x0 = x0.detach().clone().requires_grad_(True)
        self.kpm = kpm
        tr = parts.transformer
        self.enc, self.dec = oracle_forward(tr, self.x0, p, kpm, parts.query_embed.weight, rules)
        hs = _ln(self.dec[-1], tr.decoder.norm) if tr.decoder.norm is not None else self.dec[-1]
        w, b = parts.class_embed.weight, parts.class_embed.bias
        self.q = torch.as_tensor(query)
        c = torch.as_tensor(cls)
        ar = torch.arange(len(query))
        self.logit = (hs[ar, self.q] * w[c]).sum(-1) + b[c]       # [B]
        self.grid = mask.shape[1:]

    def _map(self, grad_x0: torch.Tensor) -> np.ndarray:
        return (self.x0 * grad_x0).sum(-1).view(len(self.q), *self.grid).detach().numpy()

    def token_map(self) -> np.ndarray:
        (g,) = torch.autograd.grad(self.logit.sum(), self.x0, retain_graph=True)
        return self._map(g)

    def _layer(self, module: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.enc[layer] if module == "encoder" else self.dec[layer]
        (g,) = torch.autograd.grad(self.logit.sum(), t, retain_graph=True)
        return t, g

    def concepts(self, module: str, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        t, g = self._layer(module, layer)
        r = (t * g).detach()
        if module == "encoder":
            return (r * (~self.kpm)[..., None]).sum(1).numpy(), None
        own = r[torch.arange(len(self.q)), self.q]
        return own.numpy(), (r.sum(1) - own).numpy()

    def conditional(self, module: str, layer: int, channel: np.ndarray) -> np.ndarray:
        """Map conditioned on ``channel[b]`` (encoder: every token; decoder: the own query only)."""
        t, g = self._layer(module, layer)
        m = torch.zeros_like(g)
        for bi, c in enumerate(channel):
            if module == "encoder":
                m[bi, :, int(c)] = 1.0
            else:
                m[bi, int(self.q[bi]), int(c)] = 1.0
        (gx,) = torch.autograd.grad(t, self.x0, grad_outputs=g * m, retain_graph=True)
        return self._map(gx)


@pytest.mark.parametrize("rules", ["cp", "attnlrp"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_detection_relevance_equals_autograd_oracle(rules, pre_norm):
    parts, (src, pos, mask), eng, cache, dets = _setup(pre_norm, rules)
    rel = detection_relevance(eng, cache, dets, LAYERS)
    for slot in range(dets.width):
        orc = Oracle(parts, src, pos, mask, rules, dets.query[:, slot], dets.class_id[:, slot])
        np.testing.assert_allclose(rel.logit[:, slot], orc.logit.detach().numpy(), rtol=1e-12)
        assert _rel_err(rel.token_maps[:, slot], orc.token_map()) <= 1e-6
        for module, layers in LAYERS.items():
            for layer in layers:
                own, others = orc.concepts(module, layer)
                assert _rel_err(rel.concepts[(module, layer)][:, slot], own) <= 1e-6, (module, layer)
                if module == "decoder":
                    assert _rel_err(rel.others[(module, layer)][:, slot], others) <= 1e-6
                    if layer < len(LAYERS["decoder"]) - 1:  # self-attention spreads to other queries
                        assert np.abs(others).max() > 1e-6
        assert np.abs(rel.token_maps[:, slot]).max() > 1e-3


@pytest.mark.parametrize("rules", ["cp", "attnlrp"])
@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("module,layer", [("encoder", 1), ("encoder", 2), ("decoder", 0), ("decoder", 1)])
def test_conditional_maps_equal_masked_gradient_oracle(rules, pre_norm, module, layer):
    parts, (src, pos, mask), eng, cache, dets = _setup(pre_norm, rules)
    rel = detection_relevance(eng, cache, dets, {module: [layer]})
    chans = top_channels(rel, module, layer, 3)                          # [B, M, 3]
    cond = conditional_maps(eng, cache, rel, module, layer, chans)
    assert cond.token_maps.shape == (len(SIZES), dets.width, 3, *mask.shape[1:])
    for slot in range(dets.width):
        orc = Oracle(parts, src, pos, mask, rules, dets.query[:, slot], dets.class_id[:, slot])
        for k in range(3):
            ref = orc.conditional(module, layer, chans[:, slot, k])
            assert _rel_err(cond.token_maps[:, slot, k], ref) <= 1e-6, (slot, k)
            # a conditional map is not the unconditional one
            assert _rel_err(cond.token_maps[:, slot, k], rel.token_maps[:, slot]) > 1e-3
    # the relevance kept at the layer is the concept relevance, and it is accounted below the layer
    kept = np.take_along_axis(rel.concepts[(module, layer)], chans, -1)
    np.testing.assert_allclose(cond.target_relevance, kept, rtol=1e-12, atol=1e-14)
    parts_sum = cond.input_relevance + cond.bias_relevance + cond.pos_relevance + cond.softmax_relevance
    np.testing.assert_allclose(parts_sum, cond.target_relevance, rtol=1e-9, atol=1e-12)


def _all_channels(b: int, m: int, module: str) -> np.ndarray:
    ch = np.tile(np.arange(D), (b, m, 1))
    if module == "decoder":
        ch = np.concatenate([ch, np.tile([OTHER_QUERIES, MEMORY_BYPASS], (b, m, 1))], -1)
    return ch


@pytest.mark.parametrize("rules", ["cp", "attnlrp"])
@pytest.mark.parametrize("eps,precision", [(0.0, "fp64"), (0.05, "fp64"), (1e-6, "fp32")])
@pytest.mark.parametrize("module,layer", [("encoder", 0), ("encoder", 2), ("decoder", 0), ("decoder", 1)])
def test_conditional_maps_over_all_channels_sum_to_the_unconditional_map(rules, eps, precision, module,
                                                                         layer):
    """Linearity: the d channel maps (plus, at a decoder layer, the other-queries and memory-bypass
    remainders) add up to the detection's map, in one pass of d(+2) targets (folded FFN maps on)."""
    parts = tiny_detr(dtype=torch.float64 if precision == "fp64" else torch.float32)
    dt = torch.float64 if precision == "fp64" else torch.float32
    src, pos, mask = token_inputs(D, SIZES, dtype=dt)
    eng = _engine(parts, rules=rules, eps=eps, precision=precision)
    cache = eng.forward_tokens(src, pos, mask)
    dets = select_detections(cache, "top2")
    rel = detection_relevance(eng, cache, dets, {module: [layer]})
    ch = _all_channels(len(SIZES), dets.width, module)
    cond = conditional_maps(eng, cache, rel, module, layer, ch)
    tol = 1e-10 if precision == "fp64" else 1e-5
    assert _rel_err(cond.token_maps.sum(2), rel.token_maps) <= tol
    channel_sum = cond.token_maps[:, :, :D].sum(2)
    if module == "encoder" or layer == len(LAYERS["decoder"]) - 1:
        # every path crosses an encoder layer; at the top decoder layer nothing bypassed it yet
        assert _rel_err(channel_sum, rel.token_maps) <= tol
    else:
        assert np.abs(cond.token_maps[:, :, D:]).max() > 1e-3  # the remainders carry relevance here


@pytest.mark.parametrize("rules", ["cp", "attnlrp"])
@pytest.mark.parametrize("pre_norm,decoder_norm", [(False, True), (True, True), (False, False)])
def test_logit_relevance_is_conserved_at_epsilon_zero(rules, pre_norm, decoder_norm):
    """logit = input + bias + pos + softmax relevance; the start is the cached class logit."""
    parts, (src, pos, mask), eng, cache, dets = _setup(pre_norm, rules, decoder_norm=decoder_norm)
    rel = detection_relevance(eng, cache, dets)
    ar = np.arange(len(SIZES))[:, None]
    logits = cache.pred_logits.numpy()[ar, dets.query, dets.class_id]
    np.testing.assert_allclose(rel.logit, logits, rtol=1e-6)
    total = rel.input_relevance + rel.bias_relevance + rel.pos_relevance + rel.softmax_relevance
    np.testing.assert_allclose(total, rel.logit, rtol=1e-9, atol=1e-12)
    assert np.abs(rel.bias_relevance).max() > 1e-3
    if rules == "cp":
        assert np.all(rel.pos_relevance == 0) and np.all(rel.softmax_relevance == 0)
    if not decoder_norm:  # the oracle without a final norm agrees too
        orc = Oracle(parts, src, pos, mask, rules, dets.query[:, 0], dets.class_id[:, 0])
        assert _rel_err(rel.token_maps[:, 0], orc.token_map()) <= 1e-6


def test_selections_pick_the_right_detections():
    parts, _, eng, cache, _ = _setup()
    probs = cache.pred_logits.softmax(-1)[..., :-1].numpy()
    best, label = probs.max(-1), probs.argmax(-1)
    top = select_detections(cache, "top3")
    for b in range(len(SIZES)):
        order = np.argsort(-best[b], kind="stable")[:3]
        assert list(top.query[b]) == list(order)
        assert list(top.class_id[b]) == list(label[b, order])
        np.testing.assert_allclose(top.score[b], best[b, order], rtol=1e-6)
    thr = float(np.sort(best.ravel())[-3])
    sel = select_detections(cache, f"score>={thr}")
    assert sel.valid.sum() == 3 and np.all(sel.score[sel.valid] >= thr - 1e-7)
    cls = select_detections(cache, "class=2")
    assert all(label[b, q] == 2 for b, q in zip(*np.nonzero(cls.valid), strict=True))
    assert int(cls.valid.sum()) == int((label == 2).sum())
    pairs = select_detections(cache, [(3, 0), (1, 2)])
    assert pairs.query.tolist() == [[3, 1], [3, 1]] and pairs.class_id.tolist() == [[0, 2], [0, 2]]
    np.testing.assert_allclose(pairs.score[:, 1], probs[:, 1, 2], rtol=1e-6)  # the given class's prob
    none = select_detections(cache, "score>=1.0")
    assert none.no_detections == [0, 1] and not none.valid.any()
    # boxes: xyxy in original image pixels, the same as engine.detections()
    cache.meta["image_sizes"] = [[40, 50], [30, 30]]
    top = select_detections(cache, "top2")
    ref = eng.detections(cache)
    for b in range(len(SIZES)):
        np.testing.assert_allclose(top.boxes[b], ref[b]["boxes"][:2], rtol=1e-6)
    # padding slots carry no relevance
    rel = detection_relevance(eng, cache, select_detections(cache, "class=2"))
    assert np.all(rel.token_maps[~select_detections(cache, "class=2").valid] == 0)


@pytest.mark.parametrize("bad,msg", [
    ("best", "'topK', 'score>=X', 'class=C'"), ("top0", "'topK'"), ("top7", "1..6"),
    ("score>=1.5", r"\[0, 1\]"), ("class=3", "valid ids are 0..2"), ("class=x", "'topK'"),
    ([(6, 0)], "valid queries are 0..5"), ([(0, 3)], "valid ids are 0..2"), ([(0,)], "pairs"), ([], "no"),
])
def test_bad_selections_raise_one_clear_line(bad, msg):
    with pytest.raises(ValueError, match=msg) as err:
        parse_selection(bad, 6, 3)
    assert "\n" not in str(err.value)


def test_bad_layers_and_channels_raise():
    _, _, eng, cache, dets = _setup()
    with pytest.raises(ValueError, match="valid layers are 0..1"):
        detection_relevance(eng, cache, dets, {"decoder": [2]})
    rel = detection_relevance(eng, cache, dets, {"encoder": [1]})
    with pytest.raises(ValueError, match="not requested"):
        conditional_maps(eng, cache, rel, "encoder", 0, np.zeros((2, 2, 1), np.int64))
    with pytest.raises(ValueError, match="0..31"):
        conditional_maps(eng, cache, rel, "encoder", 1, np.full((2, 2, 1), -1))
