"""The forward cache as typed per-layer records, and rule sets as a table of per-operation rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lrp_ray.lrp import (
    RULES,
    AttentionRecord,
    DecoderLayerRecord,
    EncoderLayerRecord,
    EngineConfig,
    ForwardCache,
    LrpEngine,
    NormRecord,
    OpRules,
    RuleSet,
)
from lrp_ray.lrp import rules as rules_mod
from tests.lrp_oracle import tiny_detr, token_inputs

SIZES = [(4, 5), (3, 3)]


def _cache(pre_norm: bool = False, precision: str = "fp32", **cfg):
    parts = tiny_detr(pre_norm=pre_norm, dtype=torch.float32)
    eng = LrpEngine(parts, EngineConfig(device="cpu", precision=precision, **cfg))
    return eng, eng.forward_tokens(*token_inputs(32, SIZES, dtype=torch.float32))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_cache_holds_typed_records_named_by_role(pre_norm):
    eng, c = _cache(pre_norm)
    assert len(c.encoder) == 3 and len(c.decoder) == 2
    assert all(isinstance(r, EncoderLayerRecord) for r in c.encoder)
    assert all(isinstance(r, DecoderLayerRecord) for r in c.decoder)
    e, d = c.encoder[1], c.decoder[0]
    assert isinstance(e.attn, AttentionRecord) and isinstance(e.ffn_norm, NormRecord)
    assert e.attn.p.shape == (2, 4, 20, 20) and e.ffn.u.shape == (2, 20, 48)
    assert e.pre_norm == d.pre_norm == pre_norm
    # the roles do not change meaning: ffn_norm's output is what the FFN reads ...
    lw = eng.weights.encoder[1]
    z = e.x + e.attn.a
    ln = torch.nn.functional.layer_norm(z, (32,), lw.ffn_norm.gamma, lw.ffn_norm.beta, lw.ffn_norm.eps)
    torch.testing.assert_close(e.ffn_norm.y, ln)
    torch.testing.assert_close(e.ffn.u, e.ffn_norm.y @ lw.ffn.w1.T + lw.ffn.b1)
    # ... and the pre/post-norm-only LayerNorms are present exactly where they exist
    assert (e.attn_norm is not None) == (d.self_attn_norm is not None) == pre_norm
    assert (e.out_norm is None) == (d.out_norm is None) == pre_norm
    if not pre_norm:
        assert e.out_norm.y is e.y and d.out_norm.y is d.y
    assert c.encoder[0].y is c.encoder[1].x and c.decoder[0].y is c.decoder[1].x
    assert c.memory is (c.encoder_norm.y if c.encoder_norm is not None else c.encoder_out)


def test_cache_names_only_top_level_tensors():
    _, c = _cache()
    assert c["pred_logits"] is c.pred_logits and c["pred_boxes"] is c.pred_boxes
    assert c["mask"] is c.mask and c["pos"] is c.pos and c["memory"] is c.memory
    assert "pred_logits" in c and "mask" in c and "enc.x.0" not in c
    for key in ("enc.x.0", "dec.0.ln1", "enc.1.p"):
        with pytest.raises(KeyError, match="typed records"):
            c[key]


def _all_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list):
        return [t for v in obj for t in _all_tensors(v)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _all_tensors(getattr(obj, f.name))]
    return []


def test_cache_counts_moves_and_serialises_shared_tensors_once():
    _, c = _cache()
    named = c.named_tensors()
    with_duplicates = _all_tensors([c.encoder, c.decoder, c.encoder_norm, c.pos, c.mask, c.qpos,
                                    c.pred_logits, c.pred_boxes])
    assert len(named) == len({id(t) for _, t in named}) == len({id(t) for t in with_duplicates})
    assert len(named) < len(with_duplicates)
    assert c.nbytes == sum(t.numel() * t.element_size() for _, t in named)
    meta = c.to("meta")
    assert meta.device.type == "meta" and meta.nbytes == c.nbytes
    assert meta.encoder[0].y is meta.encoder[1].x and meta.decoder[1].out_norm.y is meta.decoder[1].y
    assert c.to("cpu") is c
    payload = c.to_numpy()
    assert set(payload["arrays"]) == {name for name, _ in named}
    back = ForwardCache.from_numpy(payload)
    assert back.nbytes == c.nbytes and back.encoder[2].y is back.encoder[2].out_norm.y
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, back.named_tensors(), strict=True))


def test_derived_data_is_dropped_and_rebuilt_identically():
    eng, c = _cache()
    a = eng.relevance(c, "encoder", 2, range(12))
    assert c.derived_nbytes > 0
    nbytes = c.nbytes
    c.drop_derived()
    assert c.derived_nbytes == 0 and c.nbytes == nbytes
    b = eng.relevance(c, "encoder", 2, range(12))
    assert np.array_equal(a.token_maps, b.token_maps)


# ---------------------------------------------------------------------------------------------- rules
def test_rule_sets_are_rows_of_a_table():
    assert set(RULES) == {"cp", "attnlrp"}
    cp, attn = RULES["cp"], RULES["attnlrp"]
    assert (cp.value_product, cp.softmax) == ("probs_constant", "constant")
    assert (attn.value_product, attn.softmax, attn.logit_product) == (
        "uniform", "input_x_gradient", "uniform")
    assert not cp.attention_relevance and attn.attention_relevance
    assert cp.ffn_foldable and attn.ffn_foldable
    assert RuleSet("cp", 1e-6).describe().startswith("cp: epsilon-rule (eps=1e-06) on linear maps")
    assert RuleSet("attnlrp", 0.0).ops is attn
    with pytest.raises(ValueError, match="unknown rule set"):
        RuleSet("lrp-0")
    with pytest.raises(ValueError, match="unknown softmax rule"):
        OpRules(**{**cp.as_dict(), "softmax": "sharpened"})
    with pytest.raises(ValueError, match="would be lost"):
        OpRules(**{**cp.as_dict(), "value_product": "uniform"})


def test_a_new_rule_set_is_one_table_entry(monkeypatch):
    """A rule set added as one row computes with the rules it names: here attnlrp's attention rules with
    an FFN rule the folded maps do not implement, so the engine propagates FFN blocks directly."""
    monkeypatch.setitem(rules_mod.FFN_ACTIVATION_RULES, "relu_pass_active_direct", rules_mod.ffn_back)
    row = OpRules(**{**RULES["attnlrp"].as_dict(), "ffn_activation": "relu_pass_active_direct"})
    monkeypatch.setitem(RULES, "attnlrp_direct", row)
    assert not row.ffn_foldable
    eng, c = _cache(rules="attnlrp_direct")
    res = eng.relevance(c, "decoder", 1, range(4), "all")
    assert not c.derived  # 24 targets, but no maps for these rules
    ref_eng, ref_c = _cache(rules="attnlrp", ffn_maps=False)
    ref = ref_eng.relevance(ref_c, "decoder", 1, range(4), "all")
    assert np.array_equal(res.token_maps, ref.token_maps)
    assert np.array_equal(res.softmax_relevance, ref.softmax_relevance)
    assert eng.numerics()["rule_ops"]["ffn_activation"] == "relu_pass_active_direct"
