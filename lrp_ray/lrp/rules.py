"""LRP rules in "modified gradient" form, vectorised over N targets, and the rule sets as data.

Relevance of an activation ``a`` is ``R = a * g``; every rule maps the ``g`` of an operation's output to
the ``g`` of its inputs. Tensors carrying ``g`` are laid out ``[B, T, N, d]`` (batch, token, target,
channel); cached activations are ``[B, T, d]`` and broadcast over N.

Every operation has a table of the backward rules it supports (``*_RULES``); a rule set (:data:`RULES`)
names one rule per operation (:class:`OpRules`):

- ``cp`` (Ali et al. 2022, conservative propagation): attention probabilities and LayerNorm scale are
  constants; the epsilon rule on every linear map (incl. LayerNorm's affine part, residual sums and
  ``P @ V``); relevance passes ReLU where it is active. With epsilon -> 0 this equals gradient x input
  of the model with detached attention probabilities and LayerNorm std.
- ``attnlrp`` (Achtibat et al. 2024): as ``cp`` for linear maps and LayerNorm, but attention is not
  frozen: the uniform rule (half to each operand) on the bilinear products ``P @ V`` and ``Q @ K^T``,
  and the softmax rule (input x gradient of the softmax), so relevance also reaches queries and keys.

Adding a rule set is one entry in :data:`RULES`; adding a rule for an operation is one entry in that
operation's table. Each backward also returns the relevance absorbed by biases (``[B, N]``) so the
engine can account for every unit of relevance that does not reach the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


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


def positional_sum_back(g: Tensor, base: Tensor, pos: Tensor, eps: float) -> Tensor:
    """Epsilon rule on the sum node ``base + pos``: the g both operands get (``pos`` absorbs its share)."""
    return stab(g, base + pos, eps)


def softmax_input_x_gradient(p: Tensor, gp: Tensor) -> Tensor:
    """Softmax rule: g of the logits from g of the probabilities ``p`` (input x gradient of the softmax)."""
    return p * (gp - (p * gp).sum(-1, keepdim=True))


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


# --------------------------------------------------------------------------------- rule tables
LAYER_NORM_RULES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "epsilon_constant_std": layernorm_back,
}
"""LayerNorm ``y = gamma * (x - mean) * rstd + beta``: (g, y, rstd, gamma, beta, eps) -> (g_x, bias)."""

LINEAR_RULES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "epsilon": linear_back,
}
"""Linear maps ``z = x @ w.T + b``: (g, z, w, b, eps) -> (g_x, bias); residual sums use its stabiliser."""

FFN_ACTIVATION_RULES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "relu_pass_active": ffn_back,
}
"""The FFN ``f = W2 act(W1 x + b1) + b2``: (g, f, u, ffn, eps) -> (g_x, bias)."""

POSITIONAL_SUM_RULES: dict[str, Callable[..., Tensor]] = {
    "epsilon_share": positional_sum_back,
}
"""``x + pos`` feeding a projection: (g, x, pos, eps) -> g of both operands."""

VALUE_PRODUCT_RULES: dict[str, tuple[float, float]] = {
    "probs_constant": (1.0, 0.0),  # P constant: o = P @ V is linear in V
    "uniform": (0.5, 0.5),         # uniform rule on the bilinear product
}
"""``o = P @ V``: the shares of ``R_o`` that reach (V, P)."""

SOFTMAX_RULES: dict[str, Callable[[Tensor, Tensor], Tensor] | None] = {
    "constant": None,                       # nothing reaches the logits
    "input_x_gradient": softmax_input_x_gradient,
}
"""``P = softmax(logits)``: (P, g_P) -> g_logits; the relevance it does not conserve is accounted."""

LOGIT_PRODUCT_RULES: dict[str, tuple[float, float]] = {
    "uniform": (0.5, 0.5),
}
"""``logits = (q * dh^-1/2) @ k^T``: the shares of ``R_logits`` that reach (q, k)."""

_TABLES: dict[str, dict[str, Any]] = {
    "layer_norm": LAYER_NORM_RULES, "linear": LINEAR_RULES, "ffn_activation": FFN_ACTIVATION_RULES,
    "positional_sum": POSITIONAL_SUM_RULES, "value_product": VALUE_PRODUCT_RULES,
    "softmax": SOFTMAX_RULES, "logit_product": LOGIT_PRODUCT_RULES,
}


@dataclass(frozen=True)
class OpRules:
    """The backward rule of every operation (a key of that operation's ``*_RULES`` table)."""

    layer_norm: str
    linear: str
    ffn_activation: str
    positional_sum: str
    value_product: str
    softmax: str
    logit_product: str
    summary: str = field(default="", compare=False)
    """Human-readable description; ``{eps}`` is replaced by the epsilon."""

    def __post_init__(self) -> None:
        for op, table in _TABLES.items():
            if getattr(self, op) not in table:
                raise ValueError(f"unknown {op} rule {getattr(self, op)!r}; choose one of {', '.join(table)}")
        if VALUE_PRODUCT_RULES[self.value_product][1] != 0 and SOFTMAX_RULES[self.softmax] is None:
            raise ValueError(f"value_product {self.value_product!r} gives the attention probabilities a "
                             f"share of relevance, but softmax {self.softmax!r} passes none on: it would be "
                             "lost")

    @property
    def attention_relevance(self) -> bool:
        """Whether relevance flows through attention probabilities into queries and keys."""
        return VALUE_PRODUCT_RULES[self.value_product][1] != 0 and SOFTMAX_RULES[self.softmax] is not None

    @property
    def ffn_foldable(self) -> bool:
        """Whether FFN blocks may be folded into per-token maps (:mod:`.blocks` implements these rules)."""
        return (self.layer_norm, self.linear, self.ffn_activation) == (
            "epsilon_constant_std", "epsilon", "relu_pass_active")

    def as_dict(self) -> dict[str, str]:
        """Operation -> rule name (JSON-able, without the summary)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "summary"}


RULES: dict[str, OpRules] = {
    "cp": OpRules(
        layer_norm="epsilon_constant_std", linear="epsilon", ffn_activation="relu_pass_active",
        positional_sum="epsilon_share", value_product="probs_constant", softmax="constant",
        logit_product="uniform",  # unused: nothing reaches the logits
        summary="cp: epsilon-rule (eps={eps}) on linear maps, attention probabilities and LayerNorm scale "
                "constant, ReLU pass-through"),
    "attnlrp": OpRules(
        layer_norm="epsilon_constant_std", linear="epsilon", ffn_activation="relu_pass_active",
        positional_sum="epsilon_share", value_product="uniform", softmax="input_x_gradient",
        logit_product="uniform",
        summary="attnlrp: epsilon-rule (eps={eps}) on linear maps, LayerNorm scale constant, uniform rule "
                "on P@V and Q@K^T, softmax input x gradient rule"),
}
"""Rule set name -> the rule of every operation."""

RULE_SETS = tuple(RULES)


@dataclass(frozen=True)
class RuleSet:
    """A named rule set (an entry of :data:`RULES`) with its epsilon; dispatches each operation's
    backward to the rule the set names."""

    name: str = "cp"
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown rule set {self.name!r}; choose one of {', '.join(RULE_SETS)}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    @property
    def ops(self) -> OpRules:
        """The rule of every operation."""
        return RULES[self.name]

    @property
    def attention_relevance(self) -> bool:
        """Whether relevance flows through attention probabilities into queries and keys."""
        return self.ops.attention_relevance

    def describe(self) -> str:
        """One line naming the rules and epsilon."""
        return self.ops.summary.format(eps=f"{self.epsilon:g}")

    def layer_norm(self, g: Tensor, y: Tensor, rstd: Tensor, gamma: Tensor,
                   beta: Tensor) -> tuple[Tensor, Tensor]:
        """g at a LayerNorm's output ``y`` -> (g at its input, relevance absorbed by ``beta``)."""
        return LAYER_NORM_RULES[self.ops.layer_norm](g, y, rstd, gamma, beta, self.epsilon)

    def linear(self, g: Tensor, z: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """g at ``z = x @ w.T + b`` -> (g at ``x``, relevance absorbed by ``b``)."""
        return LINEAR_RULES[self.ops.linear](g, z, w, b, self.epsilon)

    def ffn(self, g: Tensor, f: Tensor, u: Tensor, ffn: Any) -> tuple[Tensor, Tensor]:
        """g at the FFN output ``f`` (hidden pre-activation ``u``) -> (g at its input, bias relevance)."""
        return FFN_ACTIVATION_RULES[self.ops.ffn_activation](g, f, u, ffn, self.epsilon)

    def sum_node(self, g: Tensor, z: Tensor) -> Tensor:
        """g at a residual sum node with output ``z`` (stabilised by the linear rule's epsilon)."""
        return stab(g, z, self.epsilon)

    def positional_sum(self, g: Tensor, base: Tensor, pos: Tensor) -> Tensor:
        """g of both operands of ``base + pos`` (the caller books ``pos``'s share)."""
        return POSITIONAL_SUM_RULES[self.ops.positional_sum](g, base, pos, self.epsilon)


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
    """Result of an attention backward: g of the value input (and of query/key inputs when relevance
    reaches the logits)."""

    value_in: Tensor
    query_in: Tensor | None
    key_in: Tensor | None
    bias: Tensor
    softmax_leak: Tensor


def attention_back(g: Tensor, c: Any, w: Any, rules: RuleSet) -> AttnGrads:
    """Backward through multi-head attention given ``g`` at its output (after ``out_proj``).

    ``c`` is the attention's cache record (:class:`~.cache.AttentionRecord`: ``p`` [B,H,Tq,Tk], ``q``,
    ``k``, ``v``, ``o``, ``a``); ``w`` its weights. The value product, softmax and logit product follow
    the rules ``rules.ops`` names.
    """
    eps = rules.epsilon
    ops = rules.ops
    n = g.shape[2]
    go, bias = rules.linear(g, c.a, w.wo, w.bo)
    go = stab(go, c.o, eps)
    p = c.p
    cd = w.wo.dtype  # the products run in the compute dtype, whatever precision the forward cached
    v_share, p_share = VALUE_PRODUCT_RULES[ops.value_product]
    gv = _unheads(mm(_heads(go, w.nheads).transpose(-1, -2), p.to(cd)).transpose(-1, -2), n)
    if v_share != 1.0:
        gv = gv * v_share
    gvin, bv = rules.linear(gv, c.v, w.wv, w.bv)
    bias = bias + bv
    zero = torch.zeros_like(bias)
    softmax = SOFTMAX_RULES[ops.softmax]
    if p_share == 0 or softmax is None:
        return AttnGrads(gvin, None, None, bias, zero)
    # the value product's share for P ...
    b, tq, _, d = go.shape
    h = w.nheads
    dh = d // h
    tk = c.v.shape[1]
    go_h = go.view(b, tq, n, h, dh).permute(0, 3, 2, 1, 4)            # [B,H,N,Tq,dh]
    v_h = c.v.view(b, tk, h, dh).permute(0, 2, 1, 3).unsqueeze(2)      # [B,H,1,Tk,dh]
    gp = p_share * mm(go_h, v_h.transpose(-1, -2).to(cd))               # [B,H,N,Tq,Tk]
    pn = p.unsqueeze(2)
    # ... through the softmax (what it does not conserve is booked as the softmax leak) ...
    gl = softmax(pn, gp)
    scale = dh ** -0.5
    q_h = c.q.view(b, tq, h, dh).permute(0, 2, 1, 3).unsqueeze(2) * scale  # [B,H,1,Tq,dh]
    k_h = c.k.view(b, tk, h, dh).permute(0, 2, 1, 3).unsqueeze(2)          # [B,H,1,Tk,dh]
    logits = (q_h @ k_h.transpose(-1, -2)).to(gp.dtype)  # unmasked, finite
    acc = torch.float64 if gp.dtype == torch.float64 else torch.float32
    leak = ((pn * gp).to(acc).sum((-1, -2)) - (logits * gl).to(acc).sum((-1, -2))).sum(1)
    r = rho(logits.squeeze(2), eps)
    if r is not None:
        gl = gl * r
    # ... and the logit product rule on logits = (q * scale) @ k^T.
    q_share, k_share = LOGIT_PRODUCT_RULES[ops.logit_product]
    gq = q_share * scale * mm(gl, k_h.to(cd))              # [B,H,N,Tq,dh]
    gk = k_share * mm(gl.transpose(-1, -2), q_h.to(cd))    # [B,H,N,Tk,dh]
    gq = gq.permute(0, 3, 2, 1, 4).reshape(b, tq, n, d)
    gk = gk.permute(0, 3, 2, 1, 4).reshape(b, tk, n, d)
    gqin, bq = rules.linear(gq, c.q, w.wq, w.bq)
    gkin, bk = rules.linear(gk, c.k, w.wk, w.bk)
    return AttnGrads(gvin, gqin, gkin, bias + bq + bk, leak)
