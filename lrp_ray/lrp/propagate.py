"""Vectorised relevance backward through encoder and decoder layers for N targets at once.

``g`` tensors are ``[B, T, N, d]``; relevance of an activation ``a`` is ``a * g``. Every call accounts
for relevance absorbed by biases, positional embeddings (attnlrp) and the softmax (attnlrp), so that
``target = input + bias + pos + softmax`` holds exactly for epsilon = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .blocks import (
    FfnBlock,
    block_back,
    block_token_maps,
    decoder_block,
    decoder_maps_nbytes,
    encoder_block,
    token_maps_nbytes,
)
from .cache import ForwardCache
from .rules import RuleSet, attention_back, layernorm_back, mm, stab, token_dot
from .targets import EncoderStart
from .weights import TransformerWeights


@dataclass
class Ledger:
    """Relevance bookkeeping for one propagation: absorbed amounts and the per-layer profile."""

    acc_dtype: torch.dtype
    bias: Tensor | float = 0.0
    pos: Tensor | float = 0.0
    softmax: Tensor | float = 0.0
    profile: list[Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def rel(self, x: Tensor, g: Tensor | EncoderStart) -> Tensor:
        """Total relevance ``sum(x * g)`` per image and target: [B, N]."""
        if isinstance(g, EncoderStart):
            return g.dot(x, self.acc_dtype)
        return token_dot(g, x, self.acc_dtype).sum(1)

    def record(self, name: str, value: Tensor) -> None:
        self.names.append(name)
        self.profile.append(value)


def _attn(c: ForwardCache, prefix: str) -> dict[str, Tensor]:
    return {k: c[prefix + k] for k in ("p", "q", "k", "v", "o", "a")}


def _split_sum(g: Tensor, base: Tensor, other: Tensor, eps: float, ledger: Ledger) -> Tensor:
    """Sum node ``z = base + other`` where ``other`` (a positional embedding) absorbs its share."""
    gs = stab(g, base + other, eps)
    ledger.pos = ledger.pos + ledger.rel(other, gs)
    return gs


def _ffn_block_back(g: Tensor | EncoderStart, c: ForwardCache, key: tuple, block: Callable[[], FfnBlock],
                    folded: bool, ledger: Ledger) -> Tensor:
    """g at a layer's output -> g at the stabilised sum node before its FFN block: through the block's
    folded per-token maps (built once per cache and layer, kept as derived data under ``key``) or
    directly. The relevance its biases absorb goes to the ledger."""
    eps = key[-1]
    if folded:
        if key not in c.derived:
            c.derived[key] = block_token_maps(block(), eps)
        e, cvec = c.derived[key]
        ledger.bias = ledger.bias + ledger.rel(cvec, g)
        return g.rows(e) if isinstance(g, EncoderStart) else mm(g, e)
    if isinstance(g, EncoderStart):
        g = g.dense()
    g, bias = block_back(g, block(), eps)
    ledger.bias = ledger.bias + bias
    return g


def _encoder_attention_back(g: Tensor, i: int, c: ForwardCache, w: TransformerWeights, rules: RuleSet,
                            ledger: Ledger) -> Tensor:
    """From g just before the attention sum node of encoder layer ``i`` (stabilised) to its input."""
    eps = rules.epsilon
    lw = w.encoder[i]
    p = f"enc.{i}."
    x, pos = c[f"enc.x.{i}"], c["pos"]
    ag = attention_back(g, _attn(c, p), lw.attn, rules)
    ledger.bias = ledger.bias + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    if w.pre_norm:
        n1 = c[p + "ln1"]
        gn1 = ag.value_in
        if ag.query_in is not None:
            gn1 = gn1 + _split_sum(ag.query_in + ag.key_in, n1, pos, eps, ledger)
        gx1, b = layernorm_back(gn1, n1, c[p + "rstd1"], lw.norm1.gamma, lw.norm1.beta, eps)
        ledger.bias = ledger.bias + b
        return g + gx1
    gx = g + ag.value_in
    if ag.query_in is not None:
        gx = gx + _split_sum(ag.query_in + ag.key_in, x, pos, eps, ledger)
    return gx


def encoder_layer_back(g: Tensor | EncoderStart, i: int, c: ForwardCache, w: TransformerWeights,
                       rules: RuleSet, ledger: Ledger, use_maps: bool = False,
                       maps_budget: int = 1 << 62) -> Tensor:
    """g at the output of encoder layer ``i`` -> g at its input.

    With ``use_maps`` the FFN block goes through folded per-token maps (:func:`_ffn_block_back`).
    """
    # stateless choice (same call -> same arithmetic, whatever the cache served before): maps for the
    # lowest layers that fit the budget, after every decoder layer's (small) per-query maps
    need = (i + 1) * token_maps_nbytes(c, w) + len(w.decoder) * decoder_maps_nbytes(c, w)
    g = _ffn_block_back(g, c, ("enc", i, rules.epsilon), lambda: encoder_block(c, i, w),
                        use_maps and need <= maps_budget, ledger)
    return _encoder_attention_back(g, i, c, w, rules, ledger)


def memory_of(c: ForwardCache, w: TransformerWeights) -> Tensor:
    """The encoder memory the decoder attends to."""
    return c["memory"] if w.encoder_norm is not None else c[f"enc.x.{len(w.encoder)}"]


def decoder_layer_back(g: Tensor, g_mem: Tensor, j: int, c: ForwardCache, w: TransformerWeights,
                       rules: RuleSet, ledger: Ledger, use_maps: bool = False,
                       maps_budget: int = 1 << 62) -> tuple[Tensor, Tensor]:
    """g at the output of decoder layer ``j`` -> (g at its query-stream input, updated g of memory).

    With ``use_maps`` the FFN block goes through folded per-query maps (:func:`_ffn_block_back`).
    """
    eps = rules.epsilon
    lw = w.decoder[j]
    p = f"dec.{j}."
    t = c[f"dec.x.{j}"]
    sa = c[p + "sa"]
    mem, pos = memory_of(c, w), c["pos"]
    qpos = c["qpos"].unsqueeze(0).expand_as(t)
    g = _ffn_block_back(g, c, ("dec", j, eps), lambda: decoder_block(c, j, w),
                        use_maps and (j + 1) * decoder_maps_nbytes(c, w) <= maps_budget, ledger)
    bias = 0.0
    if w.pre_norm:
        n1, n2 = c[p + "ln1"], c[p + "ln2"]
        ag = attention_back(g, _attn(c, p + "c"), lw.cross_attn, rules)
        g_mem = g_mem + ag.value_in
        if ag.query_in is not None:
            g_mem = g_mem + _split_sum(ag.key_in, mem, pos, eps, ledger)
            gn2 = _split_sum(ag.query_in, n2, qpos, eps, ledger)
            gz1, b = layernorm_back(gn2, n2, c[p + "rstd2"], lw.norm2.gamma, lw.norm2.beta, eps)
            g = g + gz1
            bias = bias + b
        bias = bias + ag.bias
        ledger.softmax = ledger.softmax + ag.softmax_leak
        g = stab(g, t + sa, eps)
        ag = attention_back(g, _attn(c, p + "s"), lw.self_attn, rules)
        gn1 = ag.value_in
        if ag.query_in is not None:
            gn1 = gn1 + _split_sum(ag.query_in + ag.key_in, n1, qpos, eps, ledger)
        gt, b = layernorm_back(gn1, n1, c[p + "rstd1"], lw.norm1.gamma, lw.norm1.beta, eps)
        ledger.bias = ledger.bias + bias + b + ag.bias
        ledger.softmax = ledger.softmax + ag.softmax_leak
        return g + gt, g_mem
    h1 = c[p + "ln1"]
    ag = attention_back(g, _attn(c, p + "c"), lw.cross_attn, rules)
    g_mem = g_mem + ag.value_in
    if ag.query_in is not None:
        g_mem = g_mem + _split_sum(ag.key_in, mem, pos, eps, ledger)
        g = g + _split_sum(ag.query_in, h1, qpos, eps, ledger)
    bias = bias + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    g, b = layernorm_back(g, h1, c[p + "rstd1"], lw.norm1.gamma, lw.norm1.beta, eps)
    bias = bias + b
    g = stab(g, t + sa, eps)
    ag = attention_back(g, _attn(c, p + "s"), lw.self_attn, rules)
    gt = g + ag.value_in
    if ag.query_in is not None:
        gt = gt + _split_sum(ag.query_in + ag.key_in, t, qpos, eps, ledger)
    ledger.bias = ledger.bias + bias + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    return gt, g_mem


def propagate(c: ForwardCache, w: TransformerWeights, rules: RuleSet, module: str, layer: int,
              g: Tensor | EncoderStart, ledger: Ledger, use_maps: bool = False,
              maps_budget: int = 1 << 62) -> Tensor:
    """Propagate ``g`` from the output of ``module`` layer ``layer`` to the encoder input tokens.

    ``use_maps``: route the layers' FFN blocks through per-token maps (building them costs about as much
    as ``hidden_dim / 4`` direct targets); decoder layer j uses them when ``j + 1`` decoder layers' maps
    fit ``maps_budget`` bytes, encoder layer i when ``i + 1`` encoder layers' and all decoder layers'
    maps fit.
    """
    if module == "decoder":
        mem = memory_of(c, w)
        b, t, n, d = g.shape[0], mem.shape[1], g.shape[2], g.shape[3]
        g_mem = torch.zeros(b, t, n, d, dtype=g.dtype, device=g.device)
        for j in range(layer, -1, -1):
            g, g_mem = decoder_layer_back(g, g_mem, j, c, w, rules, ledger, use_maps, maps_budget)
            ledger.record(f"decoder.{j}.in", ledger.rel(c[f"dec.x.{j}"], g) + ledger.rel(mem, g_mem))
        g = g_mem
        top = len(w.encoder) - 1
        if w.encoder_norm is not None:
            nw = w.encoder_norm
            g, bias = layernorm_back(g, mem, c["enc.norm.rstd"], nw.gamma, nw.beta, rules.epsilon)
            ledger.bias = ledger.bias + bias
            ledger.record("encoder.norm.in", ledger.rel(c[f"enc.x.{top + 1}"], g))
    else:
        top = layer
    for i in range(top, -1, -1):
        g = encoder_layer_back(g, i, c, w, rules, ledger, use_maps, maps_budget)
        ledger.record(f"encoder.{i}.in", ledger.rel(c[f"enc.x.{i}"], g))
    return g


def profile_names(w: TransformerWeights, module: str, layer: int) -> list[str]:
    """Names of the profile points a target at (module, layer) crosses, top to bottom."""
    names: list[str] = []
    if module == "decoder":
        names += [f"decoder.{j}.in" for j in range(layer, -1, -1)]
        if w.encoder_norm is not None:
            names.append("encoder.norm.in")
        top = len(w.encoder) - 1
    else:
        top = layer
    return names + [f"encoder.{i}.in" for i in range(top, -1, -1)]
