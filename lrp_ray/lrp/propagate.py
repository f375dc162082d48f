"""Vectorised relevance backward through encoder and decoder layers for N targets at once.

``g`` tensors are ``[B, T, N, d]``; relevance of an activation ``a`` is ``a * g``. Every call accounts
for relevance absorbed by biases, positional embeddings (attnlrp) and the softmax (attnlrp), so that
``target = input + bias + pos + softmax`` holds exactly for epsilon = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cache import ForwardCache
from .rules import (
    RuleSet,
    attention_back,
    ffn_back,
    ffn_gate_scale,
    gated_products,
    layernorm_back,
    mm,
    rho,
    stab,
    token_dot,
)
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


def _rho(z: Tensor, eps: float) -> Tensor | None:
    """Epsilon factor ``z / (z + eps sign z)`` per token and channel ([..., d]) or None for eps = 0."""
    r = rho(z, eps)
    return None if r is None else r.squeeze(2)


def _vec(a: Tensor, v: Tensor | None) -> Tensor:
    return a if v is None else a * v


def _ln_vec(v: Tensor, rstd: Tensor, gamma: Tensor) -> Tensor:
    """L @ v for column vectors v [n, d]."""
    return rstd[:, None] * gamma * (v - v.mean(-1, keepdim=True))


MAP_BLOCK_BYTES = {"cpu": 1 << 22, "other": 1 << 28}
"""Per-token maps are built and folded in blocks: cache-sized on CPU, large batched products elsewhere."""


@dataclass(frozen=True)
class FfnBlock:
    """The per-token part of a layer, from the sum node ``z`` that feeds it to the layer output ``y``.

    post-norm: ``h = LN_a(z)``, ``y = LN_b(h + FFN(h))``; ``ln``/``rstd``/``norm`` are LN_a's output, 1/std
    and parameters, ``rstd_out``/``norm_out`` LN_b's. pre-norm: ``n = LN(z)``, ``y = z + FFN(n)``.
    """

    z: Tensor
    y: Tensor
    f: Tensor
    u: Tensor
    ffn: Any
    ln: Tensor
    rstd: Tensor
    norm: Any
    rstd_out: Tensor | None = None
    norm_out: Any = None

    @property
    def pre_norm(self) -> bool:
        return self.norm_out is None


def encoder_block(c: ForwardCache, i: int, w: TransformerWeights) -> FfnBlock:
    lw, p = w.encoder[i], f"enc.{i}."
    z = c[f"enc.x.{i}"] + c[p + "a"]
    common = dict(z=z, y=c[f"enc.x.{i + 1}"], f=c[p + "f"], u=c[p + "u"], ffn=lw.ffn)
    if w.pre_norm:
        return FfnBlock(**common, ln=c[p + "ln2"], rstd=c[p + "rstd2"], norm=lw.norm2)
    return FfnBlock(**common, ln=c[p + "ln1"], rstd=c[p + "rstd1"], norm=lw.norm1,
                    rstd_out=c[p + "rstd2"], norm_out=lw.norm2)


def decoder_block(c: ForwardCache, j: int, w: TransformerWeights) -> FfnBlock:
    lw, p = w.decoder[j], f"dec.{j}."
    common = dict(y=c[f"dec.x.{j + 1}"], f=c[p + "f"], u=c[p + "u"], ffn=lw.ffn)
    if w.pre_norm:
        z = c[f"dec.x.{j}"] + c[p + "sa"] + c[p + "ca"]
        return FfnBlock(z=z, **common, ln=c[p + "ln3"], rstd=c[p + "rstd3"], norm=lw.norm3)
    return FfnBlock(z=c[p + "ln1"] + c[p + "ca"], **common, ln=c[p + "ln2"], rstd=c[p + "rstd2"],
                    norm=lw.norm2, rstd_out=c[p + "rstd3"], norm_out=lw.norm3)


def block_token_maps(b: FfnBlock, eps: float, sparse: bool | None = None) -> tuple[Tensor, Tensor]:
    """Fold a layer's per-token part (LayerNorms, FFN, residual, epsilon factors) into one matrix per
    token: ``g_z = g_out @ E_t`` (g at the stabilised sum node ``z``), and one vector ``c_t`` with the
    relevance its biases absorb, ``sum_t g_out[t] . c_t``.

    Building costs ``d * d`` per token and active FFN unit once per cache and layer; each target then
    costs ``d*d`` per token instead of ``2 * d * dff`` plus a dozen elementwise passes.
    """
    bsz, t, d = b.z.shape
    n = bsz * t
    w1, w2 = b.ffn.w1, b.ffn.w2
    dt = w1.dtype
    flat = lambda z: z.reshape(n, -1).to(dt)
    scale = ffn_gate_scale(b.u, eps, dt).reshape(n, -1)
    vecs = (scale * b.ffn.b1) @ w2.T
    mvec = lambda v: (scale * (v @ w1.T)) @ w2.T  # M_t v for every token, without the maps
    r_f, r_y, r_z1 = _rho(flat(b.f), eps), _rho(flat(b.y), eps), _rho(flat(b.z), eps)
    b2 = b.ffn.b2.to(dt)
    if b.pre_norm:
        rstd2, g2 = flat(b.rstd).squeeze(-1), b.norm.gamma.to(dt)
        r_n2 = _rho(flat(b.ln), eps)
        beta2 = _vec(b.norm.beta.to(dt), r_n2)
        cvec = _vec(_vec(b2 + vecs + mvec(beta2), r_f), r_y)

        def fold(m: Tensor, s: slice) -> None:
            # E = diag(r_y) (I + rstd2 diag(r_f) M diag(r_n2 gamma2) C) diag(r_z1), C = I - 11^T/d
            _scale_rows(m, _at(r_f, s))
            m.mul_((g2 if r_n2 is None else r_n2[s] * g2).unsqueeze(-2))
            m.sub_(m.mean(-1, keepdim=True))
            _scale_rows(m, _vec(rstd2[s, None], _at(r_y, s)))
            _scale_cols(m, _at(r_z1, s))
            diag = _prod(_at(r_y, s), _at(r_z1, s))
            m.diagonal(dim1=-2, dim2=-1).add_(1.0 if diag is None else diag)
    else:
        h = flat(b.ln)
        rstd1, rstd2 = flat(b.rstd).squeeze(-1), flat(b.rstd_out).squeeze(-1)
        g1, g2 = b.norm.gamma.to(dt), b.norm_out.gamma.to(dt)
        r_z2, r_h = _rho(h + flat(b.f), eps), _rho(h, eps)
        t1 = _vec(b.norm.beta.to(dt), r_h)
        kt1 = t1 + _vec(mvec(t1), r_f)
        s2 = _vec(_vec(b2 + vecs, r_f) + kt1, r_z2)
        cvec = _vec(b.norm_out.beta.to(dt), r_y) + _vec(_ln_vec(s2, rstd2, g2), r_y)

        def fold(m: Tensor, s: slice) -> None:
            # E = rstd1 rstd2 diag(r_y gamma2) C diag(r_z2) (I + diag(r_f) M) diag(r_h gamma1) C diag(r_z1)
            _scale_rows(m, _prod(_at(r_z2, s), _at(r_f, s)))
            m.diagonal(dim1=-2, dim2=-1).add_(1.0 if r_z2 is None else r_z2[s])
            m.sub_(m.mean(-2, keepdim=True))
            _scale_rows(m, _vec((rstd1[s] * rstd2[s])[:, None] * g2, _at(r_y, s)))
            _scale_cols(m, _vec(g1, _at(r_h, s)))
            m.sub_(m.mean(-1, keepdim=True))
            _scale_cols(m, _at(r_z1, s))
    e = torch.empty(n, d, d, dtype=dt, device=b.z.device)
    cpu = b.z.device.type == "cpu"  # elsewhere a block's dense product needs a [blk, d, dff] operand
    dff = w1.shape[0]
    blk = max(1, MAP_BLOCK_BYTES["cpu" if cpu else "other"] // (d * (d if cpu else dff) * e.element_size()))
    for k in range(0, n, blk):
        s = slice(k, k + blk)
        fold(gated_products(w2, w1, scale[s], e[s], sparse), s)  # in place, block by block
    return e.view(bsz, t, d, d), cvec.view(bsz, t, d)


def block_back(g: Tensor, b: FfnBlock, eps: float) -> tuple[Tensor, Tensor]:
    """Direct path through a layer's FFN block: g at the layer output -> g at the stabilised sum node
    ``z``, and the relevance the block's biases and LayerNorm shifts absorb ([B, N])."""
    if b.pre_norm:
        g = stab(g, b.y, eps)
        gf, b1 = ffn_back(g, b.f, b.u, b.ffn, eps)
        gn, b2 = layernorm_back(gf, b.ln, b.rstd, b.norm.gamma, b.norm.beta, eps)
        return stab(g + gn, b.z, eps), b1 + b2
    g, b1 = layernorm_back(g, b.y, b.rstd_out, b.norm_out.gamma, b.norm_out.beta, eps)
    g = stab(g, b.ln + b.f, eps)
    gf, b2 = ffn_back(g, b.f, b.u, b.ffn, eps)
    g, b3 = layernorm_back(g + gf, b.ln, b.rstd, b.norm.gamma, b.norm.beta, eps)
    return stab(g, b.z, eps), b1 + b2 + b3


def encoder_token_maps(c: ForwardCache, i: int, w: TransformerWeights, eps: float,
                       sparse: bool | None = None) -> tuple[Tensor, Tensor]:
    """:func:`block_token_maps` of encoder layer ``i`` (per encoder token)."""
    return block_token_maps(encoder_block(c, i, w), eps, sparse)


def decoder_token_maps(c: ForwardCache, j: int, w: TransformerWeights, eps: float,
                       sparse: bool | None = None) -> tuple[Tensor, Tensor]:
    """:func:`block_token_maps` of decoder layer ``j`` (per object query)."""
    return block_token_maps(decoder_block(c, j, w), eps, sparse)


def _at(v: Tensor | None, s: slice) -> Tensor | None:
    return None if v is None else v[s]


def _prod(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else _vec(a, b)


def _scale_rows(m: Tensor, v: Tensor | None) -> None:
    """m <- diag(v) @ m in place, for per-token matrices m [n, d, d] and v [n, d] (None: identity)."""
    if v is not None:
        m.mul_(v.unsqueeze(-1))


def _scale_cols(m: Tensor, v: Tensor | None) -> None:
    """m <- m @ diag(v) in place (v [n, d] or [d])."""
    if v is not None:
        m.mul_(v.unsqueeze(-2))


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


def token_maps_nbytes(c: ForwardCache) -> int:
    """Bytes of one encoder layer's folded per-token maps for this cache."""
    b, t, d = c["enc.x.0"].shape
    return b * t * (d * d + d) * c["enc.0.u"].element_size()


def encoder_layer_back(g: Tensor | EncoderStart, i: int, c: ForwardCache, w: TransformerWeights,
                       rules: RuleSet, ledger: Ledger, use_maps: bool = False,
                       maps_budget: int = 1 << 62) -> Tensor:
    """g at the output of encoder layer ``i`` -> g at its input.

    With ``use_maps`` the per-token part goes through the folded maps of :func:`encoder_token_maps`
    (built once per cache and layer, kept as derived data).
    """
    eps = rules.epsilon
    key = ("enc", i, eps)
    # stateless choice (same call -> same arithmetic, whatever the cache served before): maps for the
    # lowest layers that fit the budget, after every decoder layer's (small) per-query maps
    if use_maps and (i + 1) * token_maps_nbytes(c) + len(w.decoder) * decoder_maps_nbytes(c) <= maps_budget:
        if key not in c.derived:
            c.derived[key] = encoder_token_maps(c, i, w, eps)
        e, cvec = c.derived[key]
        ledger.bias = ledger.bias + ledger.rel(cvec, g)
        gz = g.rows(e) if isinstance(g, EncoderStart) else mm(g, e)
        return _encoder_attention_back(gz, i, c, w, rules, ledger)
    if isinstance(g, EncoderStart):
        g = g.dense()
    g, bias = block_back(g, encoder_block(c, i, w), eps)
    ledger.bias = ledger.bias + bias
    return _encoder_attention_back(g, i, c, w, rules, ledger)


def memory_of(c: ForwardCache, w: TransformerWeights) -> Tensor:
    """The encoder memory the decoder attends to."""
    return c["memory"] if w.encoder_norm is not None else c[f"enc.x.{len(w.encoder)}"]


def decoder_maps_nbytes(c: ForwardCache) -> int:
    """Bytes of one decoder layer's folded per-query maps for this cache."""
    b, q, d = c["dec.x.0"].shape
    return b * q * (d * d + d) * c["dec.0.u"].element_size()


def decoder_layer_back(g: Tensor, g_mem: Tensor, j: int, c: ForwardCache, w: TransformerWeights,
                       rules: RuleSet, ledger: Ledger, use_maps: bool = False,
                       maps_budget: int = 1 << 62) -> tuple[Tensor, Tensor]:
    """g at the output of decoder layer ``j`` -> (g at its query-stream input, updated g of memory).

    With ``use_maps`` the FFN block goes through the folded per-query maps of :func:`decoder_token_maps`.
    """
    eps = rules.epsilon
    lw = w.decoder[j]
    p = f"dec.{j}."
    t = c[f"dec.x.{j}"]
    sa = c[p + "sa"]
    mem, pos = memory_of(c, w), c["pos"]
    qpos = c["qpos"].unsqueeze(0).expand_as(t)
    key = ("dec", j, eps)
    if use_maps and (j + 1) * decoder_maps_nbytes(c) <= maps_budget:
        if key not in c.derived:
            c.derived[key] = decoder_token_maps(c, j, w, eps)
        e, cvec = c.derived[key]
        bias = ledger.rel(cvec, g)
        g = mm(g, e)
    else:
        g, bias = block_back(g, decoder_block(c, j, w), eps)
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
