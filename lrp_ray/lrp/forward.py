"""One forward pass of the DETR transformer that records everything the relevance backward needs.

Re-implements the reference layer semantics functionally from the layers' own parameters, so the same
code serves our DETR and any structurally equal model (e.g. one built by detectron2).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .cache import (
    AttentionRecord,
    DecoderLayerRecord,
    EncoderLayerRecord,
    FfnRecord,
    ForwardCache,
    NormRecord,
)
from .weights import AttnWeights, NormWeights, TransformerWeights


def _norm(x: Tensor, nw: NormWeights) -> NormRecord:
    """LayerNorm as a cache record."""
    return NormRecord(*layer_norm(x, nw))


def layer_norm(x: Tensor, nw: NormWeights) -> tuple[Tensor, Tensor]:
    """LayerNorm in the activations' dtype (fp32 or fp64); returns (output, 1/std per token)."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + nw.eps)
    y = (xf - mean) * rstd * nw.gamma.to(xf.dtype) + nw.beta.to(xf.dtype)
    return y.to(x.dtype), rstd.squeeze(-1).to(x.dtype)


def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``x @ w.T + b`` computed in the weights' dtype, returned in the activations' dtype."""
    if x.dtype == w.dtype:
        return F.linear(x, w, b)
    return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def attention(q_in: Tensor, k_in: Tensor, v_in: Tensor, w: AttnWeights,
              key_padding_mask: Tensor | None) -> AttentionRecord:
    """Multi-head attention as nn.MultiheadAttention computes it; keeps probs, q, k, v, o, out."""
    q = linear(q_in, w.wq, w.bq)
    k = linear(k_in, w.wk, w.bk)
    v = linear(v_in, w.wv, w.bv)
    b, tq, d = q.shape
    tk = k.shape[1]
    h = w.nheads
    dh = d // h
    qh = q.view(b, tq, h, dh).transpose(1, 2) * (dh ** -0.5)
    kh = k.view(b, tk, h, dh).transpose(1, 2)
    cdt = w.wq.dtype
    logits = (qh.to(cdt) @ kh.to(cdt).transpose(-1, -2)).to(q.dtype)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    p = logits.softmax(-1).to(cdt)  # probabilities are stored in the compute dtype
    vh = v.view(b, tk, h, dh).transpose(1, 2)
    o = (p @ vh.to(cdt)).to(q.dtype).transpose(1, 2).reshape(b, tq, d)
    out = linear(o, w.wo, w.bo)
    return AttentionRecord(p=p, q=q, k=k, v=v, o=o, a=out)


def _ffn(x: Tensor, ffn) -> FfnRecord:
    u = linear(x, ffn.w1, ffn.b1)
    f = linear(F.relu(u), ffn.w2, ffn.b2)
    return FfnRecord(u=u.to(ffn.w1.dtype), f=f)  # the wide hidden pre-activation in the compute dtype


@torch.no_grad()
def run_forward(weights: TransformerWeights, src: Tensor, pos: Tensor, mask: Tensor,
                query_embed: Tensor) -> tuple[ForwardCache, Tensor]:
    """Forward through encoder and decoder recording activations.

    ``src``/``pos``: [B,d,h,w]; ``mask``: [B,h,w] (True = padding); ``query_embed``: [Q,d].
    Returns the cache and the last decoder layer's output [B,Q,d] (before ``decoder.norm``).
    """
    bsz, d, gh, gw = src.shape
    x = src.flatten(2).transpose(1, 2).contiguous()
    pos_t = pos.flatten(2).transpose(1, 2).contiguous().to(x.dtype)
    key_mask = mask.flatten(1)
    qe = query_embed.to(x.dtype)
    pre = weights.pre_norm
    encoder: list[EncoderLayerRecord] = []
    for lw in weights.encoder:
        if pre:
            n1 = _norm(x, lw.attn_norm)
            att = attention(n1.y + pos_t, n1.y + pos_t, n1.y, lw.attn, key_mask)
            z1 = x + att.a
            n2 = _norm(z1, lw.ffn_norm)
            ffn = _ffn(n2.y, lw.ffn)
            y = z1 + ffn.f
            encoder.append(EncoderLayerRecord(x=x, attn=att, ffn_norm=n2, ffn=ffn, y=y, attn_norm=n1))
        else:
            att = attention(x + pos_t, x + pos_t, x, lw.attn, key_mask)
            h1 = _norm(x + att.a, lw.ffn_norm)
            ffn = _ffn(h1.y, lw.ffn)
            out = _norm(h1.y + ffn.f, lw.out_norm)
            y = out.y
            encoder.append(EncoderLayerRecord(x=x, attn=att, ffn_norm=h1, ffn=ffn, y=y, out_norm=out))
        x = y
    enc_norm = _norm(x, weights.encoder_norm) if weights.encoder_norm is not None else None
    memory = enc_norm.y if enc_norm is not None else x
    qn = query_embed.shape[0]
    qpos = qe.unsqueeze(0).expand(bsz, qn, d)
    tgt = torch.zeros(bsz, qn, d, dtype=x.dtype, device=x.device)
    mem_k = memory + pos_t
    decoder: list[DecoderLayerRecord] = []
    for lw in weights.decoder:
        if pre:
            n1 = _norm(tgt, lw.self_attn_norm)
            sa = attention(n1.y + qpos, n1.y + qpos, n1.y, lw.self_attn, None)
            z1 = tgt + sa.a
            n2 = _norm(z1, lw.cross_attn_norm)
            ca = attention(n2.y + qpos, mem_k, memory, lw.cross_attn, key_mask)
            z2 = z1 + ca.a
            n3 = _norm(z2, lw.ffn_norm)
            ffn = _ffn(n3.y, lw.ffn)
            y = z2 + ffn.f
            decoder.append(DecoderLayerRecord(x=tgt, self_attn=sa, cross_attn_norm=n2, cross_attn=ca,
                                              ffn_norm=n3, ffn=ffn, y=y, self_attn_norm=n1))
        else:
            sa = attention(tgt + qpos, tgt + qpos, tgt, lw.self_attn, None)
            h1 = _norm(tgt + sa.a, lw.cross_attn_norm)
            ca = attention(h1.y + qpos, mem_k, memory, lw.cross_attn, key_mask)
            h2 = _norm(h1.y + ca.a, lw.ffn_norm)
            ffn = _ffn(h2.y, lw.ffn)
            out = _norm(h2.y + ffn.f, lw.out_norm)
            y = out.y
            decoder.append(DecoderLayerRecord(x=tgt, self_attn=sa, cross_attn_norm=h1, cross_attn=ca,
                                              ffn_norm=h2, ffn=ffn, y=y, out_norm=out))
        tgt = y
    valid = ~mask
    valid_hw = [[int(valid[b].any(1).sum()), int(valid[b].any(0).sum())] for b in range(bsz)]
    meta = {
        "grid": [int(gh), int(gw)], "valid_hw": valid_hw, "enc_layers": len(encoder),
        "dec_layers": len(decoder), "nheads": weights.nheads, "pre_norm": pre,
        "num_queries": int(qn), "hidden_dim": int(d), "dim_ff": weights.dim_ff,
        "dtype": str(x.dtype).replace("torch.", ""),
    }
    cache = ForwardCache(encoder=encoder, decoder=decoder, pos=pos_t, mask=key_mask, qpos=qe,
                         encoder_norm=enc_norm, meta=meta)
    return cache, tgt
