"""Vectorised relevance backward through encoder and decoder layers for N targets at once.

``g`` tensors are ``[B, T, N, d]``; relevance of an activation ``a`` is ``a * g``. Every call accounts
for relevance absorbed by biases, positional embeddings (attnlrp) and the softmax (attnlrp), so that
``target = input + bias + pos + softmax`` holds exactly for epsilon = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import ForwardCache
from .rules import RuleSet, attention_back, ffn_back, ffn_back_tokenwise, ffn_token_maps, layernorm_back, stab
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

    def rel(self, x: Tensor, g: Tensor) -> Tensor:
        """Total relevance ``sum(x * g)`` per image and target: [B, N]."""
        return torch.einsum("btd,btnd->bn", x.to(self.acc_dtype), g.to(self.acc_dtype))

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


def _encoder_ffn_back(g: Tensor, i: int, c: ForwardCache, w: TransformerWeights, eps: float,
                      maps_after: int | None):
    """Encoder FFN backward: through per-token maps (built once per cache and layer, kept as derived
    data) once ``maps_after`` targets have used this layer of this cache, else directly."""
    key = ("ffn", i, eps)
    used = c.usage.get(("enc", i), 0)
    if key not in c.derived and (maps_after is None or used < maps_after):
        return ffn_back(g, c[f"enc.{i}.f"], c[f"enc.{i}.u"], w.encoder[i].ffn, eps)
    if key not in c.derived:
        c.derived[key] = ffn_token_maps(c[f"enc.{i}.u"], w.encoder[i].ffn, eps)
    maps, vecs = c.derived[key]
    return ffn_back_tokenwise(g, c[f"enc.{i}.f"], maps, vecs, w.encoder[i].ffn.b2, eps)


def encoder_layer_back(g: Tensor, i: int, c: ForwardCache, w: TransformerWeights, rules: RuleSet,
                       ledger: Ledger, maps_after: int | None = None) -> Tensor:
    """g at the output of encoder layer ``i`` -> g at its input."""
    eps = rules.epsilon
    lw = w.encoder[i]
    p = f"enc.{i}."
    x, y = c[f"enc.x.{i}"], c[f"enc.x.{i + 1}"]
    f, a = c[p + "f"], c[p + "a"]
    pos = c["pos"]
    if w.pre_norm:
        n1, n2 = c[p + "ln1"], c[p + "ln2"]
        z1 = x + a
        g = stab(g, y, eps)
        gf, b1 = _encoder_ffn_back(g, i, c, w, eps, maps_after)
        gn2, b2 = layernorm_back(gf, n2, c[p + "rstd2"], lw.norm2.gamma, lw.norm2.beta, eps)
        g = stab(g + gn2, z1, eps)
        ag = attention_back(g, _attn(c, p), lw.attn, rules)
        gn1 = ag.value_in
        if ag.query_in is not None:
            gn1 = gn1 + _split_sum(ag.query_in + ag.key_in, n1, pos, eps, ledger)
        gx1, b3 = layernorm_back(gn1, n1, c[p + "rstd1"], lw.norm1.gamma, lw.norm1.beta, eps)
        ledger.bias = ledger.bias + b1 + b2 + b3 + ag.bias
        ledger.softmax = ledger.softmax + ag.softmax_leak
        return g + gx1
    h = c[p + "ln1"]
    g, b1 = layernorm_back(g, y, c[p + "rstd2"], lw.norm2.gamma, lw.norm2.beta, eps)
    g = stab(g, h + f, eps)
    gf, b2 = _encoder_ffn_back(g, i, c, w, eps, maps_after)
    g, b3 = layernorm_back(g + gf, h, c[p + "rstd1"], lw.norm1.gamma, lw.norm1.beta, eps)
    g = stab(g, x + a, eps)
    ag = attention_back(g, _attn(c, p), lw.attn, rules)
    gx = g + ag.value_in
    if ag.query_in is not None:
        gx = gx + _split_sum(ag.query_in + ag.key_in, x, pos, eps, ledger)
    ledger.bias = ledger.bias + b1 + b2 + b3 + ag.bias
    ledger.softmax = ledger.softmax + ag.softmax_leak
    return gx


def memory_of(c: ForwardCache, w: TransformerWeights) -> Tensor:
    """The encoder memory the decoder attends to."""
    return c["memory"] if w.encoder_norm is not None else c[f"enc.x.{len(w.encoder)}"]


def decoder_layer_back(g: Tensor, g_mem: Tensor, j: int, c: ForwardCache, w: TransformerWeights,
                       rules: RuleSet, ledger: Ledger) -> tuple[Tensor, Tensor]:
    """g at the output of decoder layer ``j`` -> (g at its query-stream input, updated g of memory)."""
    eps = rules.epsilon
    lw = w.decoder[j]
    p = f"dec.{j}."
    t, y = c[f"dec.x.{j}"], c[f"dec.x.{j + 1}"]
    f, u = c[p + "f"], c[p + "u"]
    sa, ca = c[p + "sa"], c[p + "ca"]
    mem, pos = memory_of(c, w), c["pos"]
    qpos = c["qpos"].unsqueeze(0).expand_as(t)
    bias = 0.0
    if w.pre_norm:
        n1, n2, n3 = c[p + "ln1"], c[p + "ln2"], c[p + "ln3"]
        z1 = t + sa
        z2 = z1 + ca
        g = stab(g, y, eps)
        gf, b = ffn_back(g, f, u, lw.ffn, eps)
        bias = bias + b
        gn3, b = layernorm_back(gf, n3, c[p + "rstd3"], lw.norm3.gamma, lw.norm3.beta, eps)
        g = stab(g + gn3, z2, eps)
        bias = bias + b
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
        g = stab(g, z1, eps)
        ag = attention_back(g, _attn(c, p + "s"), lw.self_attn, rules)
        gn1 = ag.value_in
        if ag.query_in is not None:
            gn1 = gn1 + _split_sum(ag.query_in + ag.key_in, n1, qpos, eps, ledger)
        gt, b = layernorm_back(gn1, n1, c[p + "rstd1"], lw.norm1.gamma, lw.norm1.beta, eps)
        ledger.bias = ledger.bias + bias + b + ag.bias
        ledger.softmax = ledger.softmax + ag.softmax_leak
        return g + gt, g_mem
    h1, h2 = c[p + "ln1"], c[p + "ln2"]
    g, b = layernorm_back(g, y, c[p + "rstd3"], lw.norm3.gamma, lw.norm3.beta, eps)
    bias = bias + b
    g = stab(g, h2 + f, eps)
    gf, b = ffn_back(g, f, u, lw.ffn, eps)
    bias = bias + b
    g, b = layernorm_back(g + gf, h2, c[p + "rstd2"], lw.norm2.gamma, lw.norm2.beta, eps)
    bias = bias + b
    g = stab(g, h1 + ca, eps)
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
              g: Tensor, ledger: Ledger, maps_after: int | None = None) -> Tensor:
    """Propagate ``g`` from the output of ``module`` layer ``layer`` to the encoder input tokens.

    ``maps_after``: route an encoder FFN through per-token maps once that many targets have used the
    layer of this cache (building them costs about as much as ``hidden_dim / 2`` direct targets).
    """
    if module == "decoder":
        mem = memory_of(c, w)
        b, t, n, d = g.shape[0], mem.shape[1], g.shape[2], g.shape[3]
        g_mem = torch.zeros(b, t, n, d, dtype=g.dtype, device=g.device)
        for j in range(layer, -1, -1):
            g, g_mem = decoder_layer_back(g, g_mem, j, c, w, rules, ledger)
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
        g = encoder_layer_back(g, i, c, w, rules, ledger, maps_after)
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
