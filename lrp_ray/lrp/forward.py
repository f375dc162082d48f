"""One forward pass of the DETR transformer that records everything the relevance backward needs.

Re-implements the reference layer semantics functionally from the layers' own parameters, so the same
code serves our DETR and any structurally equal model (e.g. one built by detectron2).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .cache import ForwardCache
from .weights import AttnWeights, NormWeights, TransformerWeights


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
              key_padding_mask: Tensor | None) -> dict[str, Tensor]:
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
    return {"p": p, "q": q, "k": k, "v": v, "o": o, "a": out}


def _ffn(x: Tensor, ffn) -> tuple[Tensor, Tensor]:
    u = linear(x, ffn.w1, ffn.b1)
    f = linear(F.relu(u), ffn.w2, ffn.b2)
    return u.to(ffn.w1.dtype), f  # the wide hidden pre-activation is stored in the compute dtype


def _store(t: dict[str, Tensor], prefix: str, att: dict[str, Tensor], tag: str) -> None:
    for key, value in att.items():
        t[f"{prefix}{tag}{key}"] = value


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
    t: dict[str, Tensor] = {"pos": pos_t, "mask": key_mask, "qpos": query_embed.to(x.dtype)}
    pre = weights.pre_norm
    for i, lw in enumerate(weights.encoder):
        p = f"enc.{i}."
        t[f"enc.x.{i}"] = x
        if pre:
            n1, r1 = layer_norm(x, lw.norm1)
            att = attention(n1 + pos_t, n1 + pos_t, n1, lw.attn, key_mask)
            z1 = x + att["a"]
            n2, r2 = layer_norm(z1, lw.norm2)
            u, f = _ffn(n2, lw.ffn)
            y = z1 + f
            t.update({p + "ln1": n1, p + "rstd1": r1, p + "ln2": n2, p + "rstd2": r2})
        else:
            att = attention(x + pos_t, x + pos_t, x, lw.attn, key_mask)
            h1, r1 = layer_norm(x + att["a"], lw.norm1)
            u, f = _ffn(h1, lw.ffn)
            y, r2 = layer_norm(h1 + f, lw.norm2)
            t.update({p + "ln1": h1, p + "rstd1": r1, p + "rstd2": r2})
        _store(t, p, att, "")
        t[p + "u"] = u
        t[p + "f"] = f
        x = y
    n_enc = len(weights.encoder)
    t[f"enc.x.{n_enc}"] = x
    memory = x
    if weights.encoder_norm is not None:
        memory, r = layer_norm(x, weights.encoder_norm)
        t["enc.norm.rstd"] = r
        t["memory"] = memory
    qn = query_embed.shape[0]
    qpos = query_embed.to(x.dtype).unsqueeze(0).expand(bsz, qn, d)
    tgt = torch.zeros(bsz, qn, d, dtype=x.dtype, device=x.device)
    mem_k = memory + pos_t
    for j, lw in enumerate(weights.decoder):
        p = f"dec.{j}."
        t[f"dec.x.{j}"] = tgt
        if pre:
            n1, r1 = layer_norm(tgt, lw.norm1)
            sa = attention(n1 + qpos, n1 + qpos, n1, lw.self_attn, None)
            z1 = tgt + sa["a"]
            n2, r2 = layer_norm(z1, lw.norm2)
            ca = attention(n2 + qpos, mem_k, memory, lw.cross_attn, key_mask)
            z2 = z1 + ca["a"]
            n3, r3 = layer_norm(z2, lw.norm3)
            u, f = _ffn(n3, lw.ffn)
            y = z2 + f
            t.update({p + "ln1": n1, p + "rstd1": r1, p + "ln2": n2, p + "rstd2": r2,
                      p + "ln3": n3, p + "rstd3": r3})
        else:
            sa = attention(tgt + qpos, tgt + qpos, tgt, lw.self_attn, None)
            h1, r1 = layer_norm(tgt + sa["a"], lw.norm1)
            ca = attention(h1 + qpos, mem_k, memory, lw.cross_attn, key_mask)
            h2, r2 = layer_norm(h1 + ca["a"], lw.norm2)
            u, f = _ffn(h2, lw.ffn)
            y, r3 = layer_norm(h2 + f, lw.norm3)
            t.update({p + "ln1": h1, p + "rstd1": r1, p + "ln2": h2, p + "rstd2": r2, p + "rstd3": r3})
        _store(t, p, sa, "s")
        _store(t, p, ca, "c")
        t[p + "u"] = u
        t[p + "f"] = f
        tgt = y
    t[f"dec.x.{len(weights.decoder)}"] = tgt
    valid = ~mask
    valid_hw = [[int(valid[b].any(1).sum()), int(valid[b].any(0).sum())] for b in range(bsz)]
    meta = {
        "grid": [int(gh), int(gw)], "valid_hw": valid_hw, "enc_layers": n_enc,
        "dec_layers": len(weights.decoder), "nheads": weights.nheads, "pre_norm": pre,
        "num_queries": int(qn), "hidden_dim": int(d), "dim_ff": weights.dim_ff,
        "dtype": str(x.dtype).replace("torch.", ""),
    }
    return ForwardCache(t, meta), tgt
