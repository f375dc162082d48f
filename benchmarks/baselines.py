"""Plain-autograd formulations of the cp rule set, used as speed baselines.

``cp`` with epsilon 0 equals gradient x input of the model whose attention probabilities and LayerNorm
std are detached. These functions compute exactly that with torch.autograd, the way a user without
lrp_ray would: the seed's way (a full forward and backward per feature) and the best batched-autograd
alternative (one forward, then ``is_grads_batched`` backwards over feature chunks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _ln(x: Tensor, m: nn.LayerNorm) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    std = (((x - mu) ** 2).mean(-1, keepdim=True) + m.eps).sqrt()
    return (x - mu) / std.detach() * m.weight + m.bias


def _mha(q_in: Tensor, k_in: Tensor, v_in: Tensor, m: nn.MultiheadAttention, kpm: Tensor | None) -> Tensor:
    d, h = m.embed_dim, m.num_heads
    wq, wk, wv = m.in_proj_weight.split(d)
    bq, bk, bv = m.in_proj_bias.split(d)
    b, tq, _ = q_in.shape
    tk = k_in.shape[1]
    q = (q_in @ wq.T + bq).view(b, tq, h, -1).transpose(1, 2)
    k = (k_in @ wk.T + bk).view(b, tk, h, -1).transpose(1, 2)
    v = (v_in @ wv.T + bv).view(b, tk, h, -1).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / (d // h) ** 0.5
    if kpm is not None:
        logits = logits.masked_fill(kpm[:, None, None, :], float("-inf"))
    p = logits.softmax(-1).detach()
    o = (p @ v).transpose(1, 2).reshape(b, tq, d)
    return o @ m.out_proj.weight.T + m.out_proj.bias


def encoder_outputs(tr: nn.Module, x: Tensor, pos: Tensor, kpm: Tensor, upto: int) -> Tensor:
    """Post-norm encoder layers 0..upto with detached attention probabilities and LayerNorm std."""
    for ly in list(tr.encoder.layers)[: upto + 1]:
        x = _ln(x + _mha(x + pos, x + pos, x, ly.self_attn, kpm), ly.norm1)
        x = _ln(x + ly.linear2(torch.relu(ly.linear1(x))), ly.norm2)
    return x


def encoder_all_outputs(tr: nn.Module, x: Tensor, pos: Tensor, kpm: Tensor) -> list[Tensor]:
    """Every encoder layer's output from one forward (same rules as :func:`encoder_outputs`)."""
    outs = []
    for i in range(len(tr.encoder.layers)):
        x = encoder_outputs(_Slice(tr, i), x, pos, kpm, 0)
        outs.append(x)
    return outs


class _Slice:
    """A view of one encoder layer with the transformer's interface (for encoder_outputs)."""

    def __init__(self, tr: nn.Module, i: int) -> None:
        self.encoder = type("E", (), {"layers": [tr.encoder.layers[i]]})()


def decoder_all_outputs(tr: nn.Module, mem: Tensor, pos: Tensor, kpm: Tensor, qembed: Tensor) -> list[Tensor]:
    """Every post-norm decoder layer's output (detached attention probabilities and LayerNorm std)."""
    qpos = qembed.unsqueeze(0).expand(mem.shape[0], -1, -1)
    t = torch.zeros_like(qpos)
    outs = []
    for ly in tr.decoder.layers:
        t = _ln(t + _mha(t + qpos, t + qpos, t, ly.self_attn, None), ly.norm1)
        t = _ln(t + _mha(t + qpos, mem + pos, mem, ly.multihead_attn, kpm), ly.norm2)
        t = _ln(t + ly.linear2(torch.relu(ly.linear1(t))), ly.norm3)
        outs.append(t)
    return outs


def decoder_output(tr: nn.Module, mem: Tensor, pos: Tensor, kpm: Tensor, qembed: Tensor) -> Tensor:
    return decoder_all_outputs(tr, mem, pos, kpm, qembed)[-1]


def seed_way_decoder(engine, batch, layer: int, features: list[int], queries: Tensor) -> Tensor:
    """The seed's way for decoder targets: per feature a full forward and a backward from decoder layer
    ``layer``'s feature on each image's query ``queries[b]`` to the encoder input."""
    tr = engine.parts.transformer
    maps = []
    for f in features:
        src, pos, mask = engine.encoder_inputs(batch)
        x0, p, kpm = tokens(src, pos, mask)
        x0 = x0.detach().requires_grad_(True)
        enc = encoder_outputs(tr, x0, p, kpm, len(tr.encoder.layers) - 1)
        y = decoder_all_outputs(tr, enc, p, kpm, engine.parts.query_embed.weight)[layer]
        target = y[torch.arange(len(queries)), queries, f].sum()
        (g,) = torch.autograd.grad(target, x0)
        maps.append((x0 * g).sum(-1).detach())
    return torch.stack(maps, 1)


def tokens(src: Tensor, pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1)


def seed_way(engine, model, batch, layer: int, features: list[int]) -> Tensor:
    """Per feature: full model forward (backbone + encoder + decoder) and a backward to the encoder input."""
    tr = engine.parts.transformer
    maps = []
    for f in features:
        src, pos, mask = engine.encoder_inputs(batch)  # the backbone runs again for every feature
        x0, p, kpm = tokens(src, pos, mask)
        x0 = x0.detach().requires_grad_(True)
        enc = encoder_outputs(tr, x0, p, kpm, len(tr.encoder.layers) - 1)
        decoder_output(tr, enc, p, kpm, engine.parts.query_embed.weight)  # the seed ran the whole model
        y = encoder_outputs(tr, x0, p, kpm, layer) if layer < len(tr.encoder.layers) - 1 else enc
        target = (y[..., f] * (~kpm)).sum()
        (g,) = torch.autograd.grad(target, x0)
        maps.append((x0 * g).sum(-1).detach())
    return torch.stack(maps, 1)


def autograd_forward(engine, batch, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The batched-autograd user's single forward: tokens (requiring grad), layer output, key mask."""
    tr = engine.parts.transformer
    with torch.no_grad():
        src, pos, mask = engine.encoder_inputs(batch)
    x0, p, kpm = tokens(src, pos, mask)
    x0 = x0.detach().requires_grad_(True)
    return x0, encoder_outputs(tr, x0, p, kpm, layer), kpm


def batched_autograd(engine, batch, layer: int, features: list[int], chunk: int = 32,
                     forward: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """One forward with a retained graph, then is_grads_batched backwards over feature chunks."""
    x0, y, kpm = forward or autograd_forward(engine, batch, layer)
    valid = (~kpm).to(y.dtype)
    maps = []
    for i in range(0, len(features), chunk):
        fs = features[i:i + chunk]
        g = torch.zeros(len(fs), *y.shape, dtype=y.dtype)
        g[torch.arange(len(fs)), :, :, torch.as_tensor(fs)] = valid
        (gx,) = torch.autograd.grad(y, x0, grad_outputs=g, is_grads_batched=True, retain_graph=True)
        maps.append((x0.detach().unsqueeze(0) * gx).sum(-1).transpose(0, 1))
    return torch.cat(maps, 1)
