"""LRP rules in "modified gradient" form, vectorised over N targets.

Relevance of an activation ``a`` is ``R = a * g``; every rule maps the ``g`` of an operation's output to
the ``g`` of its inputs. Tensors carrying ``g`` are laid out ``[B, T, N, d]`` (batch, token, target,
channel); cached activations are ``[B, T, d]`` and broadcast over N.

Rule sets
- ``cp`` (Ali et al. 2022, conservative propagation): attention probabilities and LayerNorm scale are
  constants; the epsilon rule on every linear map (incl. LayerNorm's affine part, residual sums and
  ``P @ V``); relevance passes ReLU where it is active. With epsilon -> 0 this equals gradient x input
  of the model with detached attention probabilities and LayerNorm std.
- ``attnlrp`` (Achtibat et al. 2024): as ``cp`` for linear maps and LayerNorm, but attention is not
  frozen: the uniform rule (half to each operand) on the bilinear products ``P @ V`` and ``Q @ K^T``,
  and the softmax rule (input x gradient of the softmax), so relevance also reaches queries and keys.

Each function also returns the relevance absorbed by biases (``[B, N]``) so the engine can account for
every unit of relevance that does not reach the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RULE_SETS = ("cp", "attnlrp")


@dataclass(frozen=True)
class RuleSet:
    """A named rule set with its epsilon."""

    name: str = "cp"
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.name not in RULE_SETS:
            raise ValueError(f"unknown rule set {self.name!r}; choose one of {', '.join(RULE_SETS)}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    @property
    def attention_relevance(self) -> bool:
        """Whether relevance flows through attention probabilities into queries and keys."""
        return self.name == "attnlrp"

    def describe(self) -> str:
        if self.name == "cp":
            return (f"cp: epsilon-rule (eps={self.epsilon:g}) on linear maps, attention probabilities and "
                    "LayerNorm scale constant, ReLU pass-through")
        return (f"attnlrp: epsilon-rule (eps={self.epsilon:g}) on linear maps, LayerNorm scale constant, "
                "uniform rule on P@V and Q@K^T, softmax input x gradient rule")


def rho(z: Tensor, eps: float) -> Tensor | None:
    """Epsilon stabiliser ``z / (z + eps * sign(z))`` broadcastable over targets, or None for eps=0."""
    if eps == 0:
        return None
    zf = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    sign = torch.where(zf >= 0, 1.0, -1.0).to(zf.dtype)
    return (zf / (zf + eps * sign)).to(z.dtype).unsqueeze(2)


def stab(g: Tensor, z: Tensor, eps: float) -> Tensor:
    """Apply the epsilon stabiliser of the node whose output is ``z``."""
    r = rho(z, eps)
    return g if r is None else g * r


def mm(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product in the operand ``b``'s (compute) dtype, result in ``a``'s (accumulation) dtype."""
    if a.dtype == b.dtype:
        return a @ b
    return (a.to(b.dtype) @ b).to(a.dtype)


def _acc(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def token_dot(g: Tensor, x: Tensor, acc: torch.dtype | None = None) -> Tensor:
    """Per token and target ``sum_d g[b,t,n,d] * x[b,t,d]``: [B, T, N] (a batched mat-vec, no copies)."""
    if acc is not None:
        g, x = g.to(acc), x.to(acc)
    else:
        g, x = _acc(g), _acc(x)
    return torch.matmul(g, x.to(g.dtype).unsqueeze(-1)).squeeze(-1)


def bias_dot(g: Tensor, b: Tensor) -> Tensor:
    """Relevance absorbed by bias ``b`` given the stabilised ``g`` of its node: [B, N]."""
    g = _acc(g)
    return torch.matmul(g, b.to(g.dtype)).sum(1)


def layernorm_back(g: Tensor, y: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor,
                   eps: float) -> tuple[Tensor, Tensor]:
    """LayerNorm with constant std: ``y = gamma * (x - mean) * rstd + beta`` (a linear map)."""
    gs = stab(g, y, eps)
    bias = bias_dot(gs, beta)
    gg = gs * gamma
    gx = (gg - gg.mean(-1, keepdim=True)) * rstd[:, :, None, None]
    return gx, bias


def linear_back(g: Tensor, z: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Epsilon rule on ``z = x @ w.T + b``."""
    gs = stab(g, z, eps)
    return mm(gs, w), bias_dot(gs, b)


def ffn_back(g: Tensor, f: Tensor, u: Tensor, ffn, eps: float) -> tuple[Tensor, Tensor]:
    """``f = W2 relu(u) + b2``, ``u = W1 x + b1``; relevance passes ReLU where active."""
    gs = stab(g, f, eps)
    bias = bias_dot(gs, ffn.b2)
    gate = (u > 0).to(u.dtype)
    r = rho(u, eps)
    gate = gate.unsqueeze(2) if r is None else gate.unsqueeze(2) * r
    gu = mm(gs, ffn.w2) * gate
    bias = bias + bias_dot(gu, ffn.b1)
    return mm(gu, ffn.w1), bias


def gated_products(left: Tensor, right: Tensor, scale: Tensor, out: Tensor,
                   sparse: bool | None = None) -> Tensor:
    """``out[n] = left @ diag(scale[n]) @ right`` per row of ``scale`` [n, k]; left [d, k], right [k, e].

    ``sparse`` (default: on CPU) multiplies only the units whose scale is nonzero, one product per row:
    closed ReLU gates (about half of them with random weights, more in trained models) cost nothing.
    Otherwise one batched product over all units (the fast form on accelerators).
    """
    if sparse is None:
        sparse = out.device.type == "cpu"
    if not sparse:
        return torch.bmm(left.unsqueeze(0) * scale[:, None, :], right.expand(len(scale), -1, -1), out=out)
    binary = bool(((scale == 0) | (scale == 1)).all())
    active = scale != 0
    for n in range(len(scale)):
        idx = active[n].nonzero().squeeze(1)
        r = right.index_select(0, idx)
        if not binary:
            r = r * scale[n].index_select(0, idx).unsqueeze(1)
        torch.mm(left.index_select(1, idx), r, out=out[n])
    return out


def ffn_gate_scale(u: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Per token and hidden unit: ReLU gate times the epsilon factor of the hidden pre-activation."""
    r = rho(u, eps)
    gate = (u > 0).to(dtype)
    return gate if r is None else gate * r.squeeze(2).to(dtype)


def _heads(g: Tensor, nheads: int) -> Tensor:
    """[B,T,N,d] -> [B,H,T,N*dh]."""
    b, t, n, d = g.shape
    dh = d // nheads
    return g.view(b, t, n, nheads, dh).permute(0, 3, 1, 2, 4).reshape(b, nheads, t, n * dh)


def _unheads(g: Tensor, n: int) -> Tensor:
    """[B,H,T,N*dh] -> [B,T,N,d]."""
    b, h, t, _ = g.shape
    return g.view(b, h, t, n, -1).permute(0, 2, 3, 1, 4).reshape(b, t, n, -1)


@dataclass
class AttnGrads:
    """Result of an attention backward: g of the value input (and of query/key inputs for attnlrp)."""

    value_in: Tensor
    query_in: Tensor | None
    key_in: Tensor | None
    bias: Tensor
    softmax_leak: Tensor


def attention_back(g: Tensor, c: dict[str, Tensor], w, rules: RuleSet) -> AttnGrads:
    """Backward through multi-head attention given ``g`` at its output (after ``out_proj``).

    ``c`` holds the cached ``p`` [B,H,Tq,Tk], ``q``, ``k``, ``v``, ``o``, ``a`` of this attention.
    """
    eps = rules.epsilon
    n = g.shape[2]
    go, bias = linear_back(g, c["a"], w.wo, w.bo, eps)
    go = stab(go, c["o"], eps)
    p = c["p"]
    cd = w.wo.dtype  # the products run in the compute dtype, whatever precision the forward cached
    half = 0.5 if rules.attention_relevance else 1.0
    gv = _unheads(mm(_heads(go, w.nheads).transpose(-1, -2), p.to(cd)).transpose(-1, -2), n)
    if half != 1.0:
        gv = gv * half
    gvin, bv = linear_back(gv, c["v"], w.wv, w.bv, eps)
    bias = bias + bv
    zero = torch.zeros_like(bias)
    if not rules.attention_relevance:
        return AttnGrads(gvin, None, None, bias, zero)
    # attnlrp: uniform rule on o = P @ V gives half of R_o to P ...
    b, tq, _, d = go.shape
    h = w.nheads
    dh = d // h
    tk = c["v"].shape[1]
    go_h = go.view(b, tq, n, h, dh).permute(0, 3, 2, 1, 4)            # [B,H,N,Tq,dh]
    v_h = c["v"].view(b, tk, h, dh).permute(0, 2, 1, 3).unsqueeze(2)   # [B,H,1,Tk,dh]
    gp = 0.5 * mm(go_h, v_h.transpose(-1, -2).to(cd))                   # [B,H,N,Tq,Tk]
    pn = p.unsqueeze(2)
    # ... softmax rule: input x gradient of the softmax ...
    gl = pn * (gp - (pn * gp).sum(-1, keepdim=True))
    scale = dh ** -0.5
    q_h = c["q"].view(b, tq, h, dh).permute(0, 2, 1, 3).unsqueeze(2) * scale  # [B,H,1,Tq,dh]
    k_h = c["k"].view(b, tk, h, dh).permute(0, 2, 1, 3).unsqueeze(2)          # [B,H,1,Tk,dh]
    logits = (q_h @ k_h.transpose(-1, -2)).to(gp.dtype)  # unmasked, finite
    acc = torch.float64 if gp.dtype == torch.float64 else torch.float32
    leak = ((pn * gp).to(acc).sum((-1, -2)) - (logits * gl).to(acc).sum((-1, -2))).sum(1)
    r = rho(logits.squeeze(2), eps)
    if r is not None:
        gl = gl * r
    # ... and the uniform rule on logits = (q * scale) @ k^T.
    gq = 0.5 * scale * mm(gl, k_h.to(cd))              # [B,H,N,Tq,dh]
    gk = 0.5 * mm(gl.transpose(-1, -2), q_h.to(cd))    # [B,H,N,Tk,dh]
    gq = gq.permute(0, 3, 2, 1, 4).reshape(b, tq, n, d)
    gk = gk.permute(0, 3, 2, 1, 4).reshape(b, tk, n, d)
    gqin, bq = linear_back(gq, c["q"], w.wq, w.bq, eps)
    gkin, bk = linear_back(gk, c["k"], w.wk, w.bk, eps)
    return AttnGrads(gvin, gqin, gkin, bias + bq + bk, leak)
