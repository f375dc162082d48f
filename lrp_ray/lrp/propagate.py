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
from .rules import RuleSet, attention_back, mm, token_dot
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


def _pos_sum(g: Tensor, base: Tensor, pos: Tensor, rules: RuleSet, ledger: Ledger) -> Tensor:
    """Sum node ``z = base + pos`` feeding a projection: ``pos`` (a positional embedding) absorbs its
    share (booked in the ledger); returns the g both operands get."""
    gs = rules.positional_sum(g, base, pos)
    ledger.pos = ledger.pos + ledger.rel(pos, gs)
    return gs


def _ffn_block_back(g: Tensor | EncoderStart, c: ForwardCache, key: tuple, block: Callable[[], FfnBlock],
                    folded: bool, rules: RuleSet, ledger: Ledger) -> Tensor:
    """g at a layer's output -> g at the stabilised sum node before its FFN block: through the block's
    folded per-token maps (built once per cache and layer, kept as derived data under ``key``) or
    directly. The relevance its biases absorb goes to the ledger."""
    if folded:
        if key not in c.derived:
            c.derived[key] = block_token_maps(block(), rules.epsilon)
        e, cvec = c.derived[key]
        ledger.bias = ledger.bias + ledger.rel(cvec, g)
        return g.rows(e) if isinstance(g, EncoderStart) else mm(g, e)
    if isinstance(g, EncoderStart):
        g = g.dense()
    g, bias = block_back(g, block(), rules)
    ledger.bias = ledger.bias + bias
    return g


def _encoder_attention_back(g: Tensor, i: int, c: ForwardCache, w: TransformerWeights, rules: RuleSet,
                            ledger: Ledger) -> Tensor:
    """From g just before the attention sum node of encoder layer ``i`` (stabilised) to its input."""
    rec, lw = c.encoder[i], w.encoder[i]
    ag = attention_back(g, rec.attn, lw.attn, rules)
    ledger.bias = ledger.bias + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    if rec.attn_norm is not None:  # pre-norm: the attention reads attn_norm(x)
        n1 = rec.attn_norm
        gn1 = ag.value_in
        if ag.query_in is not None:
            gn1 = gn1 + _pos_sum(ag.query_in + ag.key_in, n1.y, c.pos, rules, ledger)
        nw = lw.attn_norm
        gx1, b = rules.layer_norm(gn1, n1.y, n1.rstd, nw.gamma, nw.beta)
        ledger.bias = ledger.bias + b
        return g + gx1
    gx = g + ag.value_in
    if ag.query_in is not None:
        gx = gx + _pos_sum(ag.query_in + ag.key_in, rec.x, c.pos, rules, ledger)
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
                        use_maps and need <= maps_budget, rules, ledger)
    return _encoder_attention_back(g, i, c, w, rules, ledger)


def memory_of(c: ForwardCache, w: TransformerWeights | None = None) -> Tensor:
    """The encoder memory the decoder attends to."""
    return c.memory


def decoder_layer_back(g: Tensor, g_mem: Tensor, j: int, c: ForwardCache, w: TransformerWeights,
                       rules: RuleSet, ledger: Ledger, use_maps: bool = False,
                       maps_budget: int = 1 << 62) -> tuple[Tensor, Tensor]:
    """g at the output of decoder layer ``j`` -> (g at its query-stream input, updated g of memory).

    With ``use_maps`` the FFN block goes through folded per-query maps (:func:`_ffn_block_back`).
    """
    rec, lw = c.decoder[j], w.decoder[j]
    t = rec.x
    mem, pos = c.memory, c.pos
    qpos = c.qpos.unsqueeze(0).expand_as(t)
    g = _ffn_block_back(g, c, ("dec", j, rules.epsilon), lambda: decoder_block(c, j, w),
                        use_maps and (j + 1) * decoder_maps_nbytes(c, w) <= maps_budget, rules, ledger)
    bias = 0.0
    cn, cnw = rec.cross_attn_norm, lw.cross_attn_norm
    if rec.self_attn_norm is not None:  # pre-norm
        n1, n1w = rec.self_attn_norm, lw.self_attn_norm
        ag = attention_back(g, rec.cross_attn, lw.cross_attn, rules)
        g_mem = g_mem + ag.value_in
        if ag.query_in is not None:
            g_mem = g_mem + _pos_sum(ag.key_in, mem, pos, rules, ledger)
            gn2 = _pos_sum(ag.query_in, cn.y, qpos, rules, ledger)
            gz1, b = rules.layer_norm(gn2, cn.y, cn.rstd, cnw.gamma, cnw.beta)
            g = g + gz1
            bias = bias + b
        bias = bias + ag.bias
        ledger.softmax = ledger.softmax + ag.softmax_leak
        g = rules.sum_node(g, t + rec.self_attn.a)
        ag = attention_back(g, rec.self_attn, lw.self_attn, rules)
        gn1 = ag.value_in
        if ag.query_in is not None:
            gn1 = gn1 + _pos_sum(ag.query_in + ag.key_in, n1.y, qpos, rules, ledger)
        gt, b = rules.layer_norm(gn1, n1.y, n1.rstd, n1w.gamma, n1w.beta)
        ledger.bias = ledger.bias + bias + b + ag.bias
        ledger.softmax = ledger.softmax + ag.softmax_leak
        return g + gt, g_mem
    h1 = cn.y  # post-norm: cross_attn_norm's output is the residual stream and the cross-attention query
    ag = attention_back(g, rec.cross_attn, lw.cross_attn, rules)
    g_mem = g_mem + ag.value_in
    if ag.query_in is not None:
        g_mem = g_mem + _pos_sum(ag.key_in, mem, pos, rules, ledger)
        g = g + _pos_sum(ag.query_in, h1, qpos, rules, ledger)
    bias = bias + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    g, b = rules.layer_norm(g, h1, cn.rstd, cnw.gamma, cnw.beta)
    bias = bias + b
    g = rules.sum_node(g, t + rec.self_attn.a)
    ag = attention_back(g, rec.self_attn, lw.self_attn, rules)
    gt = g + ag.value_in
    if ag.query_in is not None:
        gt = gt + _pos_sum(ag.query_in + ag.key_in, t, qpos, rules, ledger)
    ledger.bias = ledger.bias + bias + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    return gt, g_mem

Visit = Callable[[str, int, Tensor, Tensor | None, Ledger], tuple[Tensor, Tensor | None, Ledger] | None]
"""Sees g (and the memory's g) at a layer output; may return replacements."""


def propagate(c: ForwardCache, w: TransformerWeights, rules: RuleSet, module: str, layer: int,
              g: Tensor | EncoderStart, ledger: Ledger, use_maps: bool = False,
              maps_budget: int = 1 << 62) -> Tensor:
    """Propagate ``g`` from the output of ``module`` layer ``layer`` to the encoder input tokens.

    ``use_maps``: route the layers' FFN blocks through per-token maps (building them costs about as much
    as ``hidden_dim / 4`` direct targets); decoder layer j uses them when ``j + 1`` decoder layers' maps
    fit ``maps_budget`` bytes, encoder layer i when ``i + 1`` encoder layers' and all decoder layers'
    maps fit. Only rule sets whose FFN-block rules the maps implement use them.
    """
    return propagate_from(c, w, rules, module, layer, g, None, ledger, None, use_maps, maps_budget)


def propagate_from(c: ForwardCache, w: TransformerWeights, rules: RuleSet, module: str, layer: int,
                   g: Tensor | EncoderStart, g_mem: Tensor | None, ledger: Ledger,
                   visit: Visit | None = None,
                   use_maps: bool = False, maps_budget: int = 1 << 62) -> Tensor:
    """g at the output of ``module`` layer ``layer`` (and, for the decoder, the memory's g accumulated
    above it) -> g at the encoder input tokens, layer by layer as :func:`propagate`.

    ``visit`` sees (and may replace) g at every layer output on the way, the first one included.
    """
    use_maps = use_maps and rules.ops.ffn_foldable
    if module == "decoder":
        mem = c.memory
        if g_mem is None:
            g_mem = torch.zeros(g.shape[0], mem.shape[1], g.shape[2], g.shape[3], dtype=g.dtype,
                                device=g.device)
        for j in range(layer, -1, -1):
            if visit is not None:
                out = visit("decoder", j, g, g_mem, ledger)
                if out is not None:
                    g, g_mem, ledger = out
            g, g_mem = decoder_layer_back(g, g_mem, j, c, w, rules, ledger, use_maps, maps_budget)
            ledger.record(f"decoder.{j}.in", ledger.rel(c.decoder[j].x, g) + ledger.rel(mem, g_mem))
        g = g_mem
        top = len(w.encoder) - 1
        if c.encoder_norm is not None:
            nw, en = w.encoder_norm, c.encoder_norm
            g, bias = rules.layer_norm(g, en.y, en.rstd, nw.gamma, nw.beta)
            ledger.bias = ledger.bias + bias
            ledger.record("encoder.norm.in", ledger.rel(c.encoder_out, g))
    else:
        top = layer
    for i in range(top, -1, -1):
        if visit is not None:
            out = visit("encoder", i, g, None, ledger)
            if out is not None:
                g, _, ledger = out
        g = encoder_layer_back(g, i, c, w, rules, ledger, use_maps, maps_budget)
        ledger.record(f"encoder.{i}.in", ledger.rel(c.encoder[i].x, g))
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
