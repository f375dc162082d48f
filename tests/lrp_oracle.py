"""Independent reference formulations of the LRP rules, by plain autograd in float64.

Written separately from the engine: the forward re-reads the modules' parameters, the backward is
torch.autograd. ``cp`` with epsilon 0 is gradient x input of the model whose attention probabilities
and LayerNorm std are detached; ``attnlrp`` additionally halves the gradient into both operands of
``P @ V`` and ``Q @ K^T`` (uniform rule) and keeps the softmax gradient (softmax rule).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lrp_ray.models.transformer import Transformer


def _half(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, half gradient."""
    return 0.5 * x + (0.5 * x).detach()


def _ln(x, m: nn.LayerNorm):
    mu = x.mean(-1, keepdim=True)
    std = (((x - mu) ** 2).mean(-1, keepdim=True) + m.eps).sqrt()
    return (x - mu) / std.detach() * m.weight + m.bias


def _mha(q_in, k_in, v_in, m: nn.MultiheadAttention, kpm, mode: str):
    d = m.embed_dim
    h = m.num_heads
    wq, wk, wv = m.in_proj_weight.split(d)
    bq, bk, bv = m.in_proj_bias.split(d)
    q = q_in @ wq.T + bq
    k = k_in @ wk.T + bk
    v = v_in @ wv.T + bv
    b, tq, _ = q.shape
    tk = k.shape[1]
    qh = q.view(b, tq, h, -1).transpose(1, 2) / (d // h) ** 0.5
    kh = k.view(b, tk, h, -1).transpose(1, 2)
    vh = v.view(b, tk, h, -1).transpose(1, 2)
    if mode == "attnlrp":
        qh, kh = _half(qh), _half(kh)
    logits = qh @ kh.transpose(-1, -2)
    if kpm is not None:
        logits = logits.masked_fill(kpm[:, None, None, :], float("-inf"))
    p = logits.softmax(-1)
    if mode == "cp":
        p = p.detach()
    if mode == "attnlrp":
        p, vh = _half(p), _half(vh)
    o = (p @ vh).transpose(1, 2).reshape(b, tq, d)
    return o @ m.out_proj.weight.T + m.out_proj.bias


def oracle_forward(tr: Transformer, x0, pos, kpm, qembed, mode: str):
    """Batch-first forward returning every encoder and decoder layer output (lists)."""
    enc_out, dec_out = [], []
    x = x0
    for ly in tr.encoder.layers:
        if ly.normalize_before:
            n1 = _ln(x, ly.norm1)
            x = x + _mha(n1 + pos, n1 + pos, n1, ly.self_attn, kpm, mode)
            x = x + ly.linear2(torch.relu(ly.linear1(_ln(x, ly.norm2))))
        else:
            x = _ln(x + _mha(x + pos, x + pos, x, ly.self_attn, kpm, mode), ly.norm1)
            x = _ln(x + ly.linear2(torch.relu(ly.linear1(x))), ly.norm2)
        enc_out.append(x)
    mem = _ln(x, tr.encoder.norm) if tr.encoder.norm is not None else x
    qpos = qembed.unsqueeze(0).expand(x0.shape[0], -1, -1)
    t = torch.zeros_like(qpos)
    for ly in tr.decoder.layers:
        if ly.normalize_before:
            n1 = _ln(t, ly.norm1)
            t = t + _mha(n1 + qpos, n1 + qpos, n1, ly.self_attn, None, mode)
            n2 = _ln(t, ly.norm2)
            t = t + _mha(n2 + qpos, mem + pos, mem, ly.multihead_attn, kpm, mode)
            t = t + ly.linear2(torch.relu(ly.linear1(_ln(t, ly.norm3))))
        else:
            t = _ln(t + _mha(t + qpos, t + qpos, t, ly.self_attn, None, mode), ly.norm1)
            t = _ln(t + _mha(t + qpos, mem + pos, mem, ly.multihead_attn, kpm, mode), ly.norm2)
            t = _ln(t + ly.linear2(torch.relu(ly.linear1(t))), ly.norm3)
        dec_out.append(t)
    return enc_out, dec_out


def oracle_relevance(tr, x0, pos, kpm, qembed, module: str, layer: int, feature: int,
                     query: int | None, mode: str) -> torch.Tensor:
    """Input relevance [B,T,d] of one target, one feature at a time, by autograd gradient x input."""
    x0 = x0.detach().clone().requires_grad_(True)
    enc, dec = oracle_forward(tr, x0, pos, kpm, qembed, mode)
    if module == "encoder":
        target = (enc[layer][..., feature] * (~kpm).to(x0.dtype)).sum()
    else:
        target = dec[layer][:, query, feature].sum()
    (grad,) = torch.autograd.grad(target, x0)
    return (x0 * grad).detach()


def tiny_detr(d=32, heads=4, dff=48, enc=3, dec=2, queries=6, classes=3, pre_norm=False, seed=0,
              dtype=torch.float64, bias_scale=0.2):
    """A small random DETR transformer plus heads, as engine parts (no backbone)."""
    torch.manual_seed(seed)
    tr = Transformer(d, heads, enc, dec, dff, dropout=0.0, normalize_before=pre_norm)
    with torch.no_grad():  # non-trivial biases and norms everywhere
        for name, p in tr.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * (0.3 if "norm" in name and "weight" in name else bias_scale)
                        + (1.0 if "norm" in name and "weight" in name else 0.0))
    parts = SimpleNamespace(
        transformer=tr.to(dtype).eval(), query_embed=nn.Embedding(queries, d).to(dtype),
        class_embed=nn.Linear(d, classes + 1).to(dtype),
        bbox_embed=nn.Linear(d, 4).to(dtype), encoder_inputs=None, module=None,
    )
    return parts


def token_inputs(d: int, sizes: list[tuple[int, int]], seed: int = 1, dtype=torch.float64):
    """Random encoder tokens for images with feature grids ``sizes``, padded to a common grid."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = max(s[0] for s in sizes), max(s[1] for s in sizes)
    b = len(sizes)
    src = torch.randn(b, d, gh, gw, generator=g, dtype=dtype)
    pos = torch.randn(b, d, gh, gw, generator=g, dtype=dtype) * 0.5
    mask = torch.ones(b, gh, gw, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = False
    return src, pos, mask
