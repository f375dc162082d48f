"""A layer's FFN block (LayerNorms, FFN, residual, epsilon factors) backward, directly or folded.

Every encoder and decoder layer ends in an FFN block that, for a fixed forward, is linear in ``g`` per
token (per object query in the decoder). It is crossed either directly (:func:`block_back`,
``2 * d * dff`` per target and token) or through per-token ``d x d`` maps folded once per cache and
layer (:func:`block_token_maps`, ``d * d`` per target and token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .cache import ForwardCache
from .rules import RuleSet, ffn_gate_scale, gated_products, rho
from .weights import TransformerWeights


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
    """Encoder layer ``i``'s FFN block, from ``z = x + attention`` to the layer output."""
    rec, lw = c.encoder[i], w.encoder[i]
    return FfnBlock(z=rec.x + rec.attn.a, y=rec.y, f=rec.ffn.f, u=rec.ffn.u, ffn=lw.ffn, ln=rec.ffn_norm.y,
                    rstd=rec.ffn_norm.rstd, norm=lw.ffn_norm,
                    rstd_out=None if rec.out_norm is None else rec.out_norm.rstd, norm_out=lw.out_norm)


def decoder_block(c: ForwardCache, j: int, w: TransformerWeights) -> FfnBlock:
    """Decoder layer ``j``'s FFN block, from the sum node after cross-attention to the layer output."""
    rec, lw = c.decoder[j], w.decoder[j]
    # pre-norm: the residual stream x + self-attention + cross-attention; post-norm: cross_attn_norm's
    # output (the normalised stream) + cross-attention
    base = rec.x + rec.self_attn.a if rec.pre_norm else rec.cross_attn_norm.y
    return FfnBlock(z=base + rec.cross_attn.a, y=rec.y, f=rec.ffn.f, u=rec.ffn.u, ffn=lw.ffn,
                    ln=rec.ffn_norm.y, rstd=rec.ffn_norm.rstd, norm=lw.ffn_norm,
                    rstd_out=None if rec.out_norm is None else rec.out_norm.rstd, norm_out=lw.out_norm)


def block_token_maps(b: FfnBlock, eps: float, sparse: bool | None = None) -> tuple[Tensor, Tensor]:
    """Fold a layer's per-token part (LayerNorms, FFN, residual, epsilon factors) into one matrix per
    token: ``g_z = g_out @ E_t`` (g at the stabilised sum node ``z``), and one vector ``c_t`` with the
    relevance its biases absorb, ``sum_t g_out[t] . c_t``.

    Building costs ``d * d`` per token and active FFN unit once per cache and layer; each target then
    costs ``d*d`` per token instead of ``2 * d * dff`` plus a dozen elementwise passes. For half compute
    dtypes the maps are built and folded in fp32 (the LayerNorm centring cancels) and stored in half.
    """
    bsz, t, d = b.z.shape
    n = bsz * t
    store = b.ffn.w1.dtype
    dt = torch.float32 if store in (torch.bfloat16, torch.float16) else store
    w1, w2 = b.ffn.w1.to(dt), b.ffn.w2.to(dt)
    flat = lambda z: z.reshape(n, -1).to(dt)
    scale = ffn_gate_scale(b.u, eps, dt).reshape(n, -1)
    vecs = (scale * b.ffn.b1.to(dt)) @ w2.T
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
    e = torch.empty(n, d, d, dtype=store, device=b.z.device)
    cpu = b.z.device.type == "cpu"  # elsewhere a block's dense product needs a [blk, d, dff] operand
    dff = w1.shape[0]
    elem = torch.empty((), dtype=dt).element_size()
    blk = max(1, MAP_BLOCK_BYTES["cpu" if cpu else "other"] // (d * (d if cpu else dff) * elem))
    for k in range(0, n, blk):
        s = slice(k, k + blk)
        m = e[s] if store == dt else torch.empty(min(k + blk, n) - k, d, d, dtype=dt, device=e.device)
        fold(gated_products(w2, w1, scale[s], m, sparse), s)  # in place, block by block
        if m.dtype != store:
            e[s] = m
    return e.view(bsz, t, d, d), cvec.view(bsz, t, d)


def block_back(g: Tensor, b: FfnBlock, rules: RuleSet) -> tuple[Tensor, Tensor]:
    """Direct path through a layer's FFN block: g at the layer output -> g at the stabilised sum node
    ``z``, and the relevance the block's biases and LayerNorm shifts absorb ([B, N])."""
    if b.pre_norm:
        g = rules.sum_node(g, b.y)
        gf, b1 = rules.ffn(g, b.f, b.u, b.ffn)
        gn, b2 = rules.layer_norm(gf, b.ln, b.rstd, b.norm.gamma, b.norm.beta)
        return rules.sum_node(g + gn, b.z), b1 + b2
    g, b1 = rules.layer_norm(g, b.y, b.rstd_out, b.norm_out.gamma, b.norm_out.beta)
    g = rules.sum_node(g, b.ln + b.f)
    gf, b2 = rules.ffn(g, b.f, b.u, b.ffn)
    g, b3 = rules.layer_norm(g + gf, b.ln, b.rstd, b.norm.gamma, b.norm.beta)
    return rules.sum_node(g, b.z), b1 + b2 + b3


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


def token_maps_nbytes(c: ForwardCache, w: TransformerWeights) -> int:
    """Bytes of one encoder layer's folded per-token maps for this cache (built in the compute dtype)."""
    b, t, d = c.tokens.shape
    return b * t * (d * d + d) * w.encoder[0].ffn.w1.element_size()


def decoder_maps_nbytes(c: ForwardCache, w: TransformerWeights) -> int:
    """Bytes of one decoder layer's folded per-query maps for this cache (built in the compute dtype)."""
    b, q, d = c.decoder[0].x.shape
    return b * q * (d * d + d) * w.decoder[0].ffn.w1.element_size()


