"""The vectorised backward of our ResNet layout without autograd: zennit's rules, K targets per kernel call.

zennit computes a rule in a backward hook: the rule's modified forwards of the layer's input, then one
autograd product per target. Here the network (canonized, with each module's zennit hook chosen by the
composite exactly as ``Composite.register`` does) is walked explicitly: one forward keeps each layer's
input (batch 1); the backward computes each rule's modified forwards once per image and its gradient
products for all K targets in one batched transposed convolution (``conv2d_input``). Same formulas as the
hooks (``gradient_mapper``/``reducer`` are called as they are), so the result equals zennit's
(``tests/test_pixels.py``); the autograd path of :mod:`.backbone` remains for layouts not walked here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_input
from zennit.core import BasicHook, ParamMod
from zennit.rules import Pass

from ..models.backbone import BasicBlock, BasicStem, BottleneckBlock, ResNet

__all__ = ["walkable", "WalkPlan"]


def walkable(net: nn.Module) -> bool:
    """Whether ``net`` (a PixelNet) has the layout this walker knows: our ResNet + a Conv2d projection."""
    body, proj = getattr(net, "body", None), getattr(net, "input_proj", None)
    return type(body) is ResNet and type(proj) is nn.Conv2d and type(body.stem) is BasicStem


def _as_list(v: Tensor | list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
    """A gradient mapper's result as a list (zennit's single-output rules return a bare tensor)."""
    return [v] if torch.is_tensor(v) else list(v)


Modified = tuple[list[Tensor], list[Tensor], list[Tensor]]


def modified_forwards(module: nn.Conv2d, hook: BasicHook, x: Tensor) -> Modified:
    """The rule's modified inputs, outputs and weights for the layer input ``x`` (target independent).

    A modified input that is all zero (e.g. the negative part of a ReLU output) gives the modified bias
    as output (``conv(0) + b == b`` exactly), without the convolution."""
    inputs, outputs, weights = [], [], []
    zero = []
    for in_mod, param_mod, out_mod in zip(hook.input_modifiers, hook.param_modifiers, hook.output_modifiers,
                                          strict=True):
        inp = in_mod(x)
        with ParamMod.ensure(param_mod)(module) as modified:
            if bool(inp.any()):
                outputs.append(out_mod(modified.forward(inp)))
                zero.append(None)
            else:
                b = getattr(modified, "bias", None)
                outputs.append(None)
                zero.append((out_mod, None if b is None else b.detach().clone()))
            weights.append(modified.weight.detach().clone())
        inputs.append(inp)
    ref = next(o for o in outputs if o is not None) if any(o is not None for o in outputs) \
        else module.forward(x)
    for i, z in enumerate(zero):
        if z is not None:
            out_mod, b = z
            base = torch.zeros_like(ref) if b is None else b.view(1, -1, 1, 1).to(ref).expand_as(ref).clone()
            outputs[i] = out_mod(base)
    return inputs, outputs, weights


def _conv_back(module: nn.Conv2d, hook: BasicHook, x: Tensor, r: Tensor, mods: Modified | None = None
               ) -> Tensor:
    """A convolution's rule for K upstream relevances ``r`` [K, C, h, w] and its input ``x`` [1, ...]."""
    inputs, outputs, weights = mods if mods is not None else modified_forwards(module, hook, x)
    grad_outputs = _as_list(hook.gradient_mapper(r, outputs))
    shape = (r.shape[0], *x.shape[1:])
    grads = []
    for inp, w, go in zip(inputs, weights, grad_outputs, strict=True):
        go = go.expand(r.shape) if go.shape != r.shape else go
        if not bool(inp.any()) or not bool(go.any()):   # a zero input (or cotangent) contributes nothing:
            grads.append(torch.zeros((1, *shape[1:]), dtype=r.dtype, device=r.device))  # (broadcast)
            continue
        grads.append(conv2d_input(shape, w, go.contiguous(), module.stride, module.padding, module.dilation,
                                  module.groups))
    rel = hook.reducer(inputs, grads)
    if rel.shape[0] != r.shape[0]:   # every gradient skipped (all-zero targets): still one map per target
        rel = rel.expand(r.shape[0], *rel.shape[1:]).clone()
    return rel


class WalkPlan:
    """The canonized network and each module's hook, for one composite (apply in a ``with`` block)."""

    def __init__(self, net: nn.Module, composite: Any) -> None:
        self.net, self.composite = net, composite
        self.hooks: dict[nn.Module, Any] = {}
        self._mods: dict[tuple[int, int], Modified] = {}
        self._stack = ExitStack()

    def __enter__(self) -> WalkPlan:
        handles = []
        for canonizer in self.composite.canonizers:
            handles += canonizer.apply(self.net)
        self._stack.callback(lambda: [h.remove() for h in reversed(handles)])
        ctx: dict = {}
        for name, child in self.net.named_modules():
            template = self.composite.module_map(ctx, name, child)
            if template is not None:
                self.hooks[child] = template
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    # ------------------------------------------------------------------------------------ pieces
    def _relu_back(self, module: nn.Module, pre: Tensor, r: Tensor) -> Tensor:
        hook = self.hooks.get(module)
        if isinstance(hook, Pass):
            return r
        if hook is None:
            return r * (pre > 0).to(r.dtype)
        raise NotImplementedError(f"rule {type(hook).__name__} on ReLU")

    def _conv(self, module: nn.Conv2d, x: Tensor, r: Tensor) -> Tensor:
        hook = self.hooks.get(module)
        if not isinstance(hook, BasicHook):
            raise NotImplementedError(f"convolution without a BasicHook rule ({type(hook).__name__})")
        key = (id(module), id(x))   # modified forwards once per layer input, shared by all target chunks
        if key not in self._mods:
            self._mods[key] = modified_forwards(module, hook, x)
        return _conv_back(module, hook, x, r, self._mods[key])

    def _sum_back(self, module: nn.Module, parts: Tensor, out: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """zennit's ``Sum`` over a stacked pair [1, ..., 2] (Norm rule, or the gradient without a rule)."""
        hook = self.hooks.get(module)
        if hook is None:
            return r, r
        if not isinstance(hook, BasicHook) or len(hook.input_modifiers) != 1:
            raise NotImplementedError(f"rule {type(hook).__name__} on a residual sum")
        inp = hook.input_modifiers[0](parts)
        with ParamMod.ensure(hook.param_modifiers[0])(module) as modified:
            z = hook.output_modifiers[0](modified.forward(inp))
        (go,) = _as_list(hook.gradient_mapper(r, [z]))
        rel = hook.reducer([inp], [go.unsqueeze(-1).expand(*go.shape, parts.shape[-1])])
        return rel[..., 0], rel[..., 1]

    # --------------------------------------------------------------------------- forward/backward
    def forward(self, x: Tensor) -> tuple[Tensor, list[Callable[[Tensor], Tensor]]]:
        """The canonized forward of one image, and the backward steps (last first) it recorded."""
        body, steps = self.net.body, []
        stem = body.stem
        if self.hooks.get(stem.canonizer_pool) is not None:
            raise NotImplementedError("a rule on the stem's max-pool")
        a = stem.conv1(x)
        h = F.relu(a)
        y, idx = F.max_pool2d(h, kernel_size=3, stride=2, padding=1, return_indices=True)
        x0 = x

        def stem_back(r: Tensor, a=a, h=h, idx=idx, x0=x0) -> Tensor:
            rh = torch.zeros((r.shape[0], *h.shape[1:]), dtype=r.dtype, device=r.device)
            rh = rh.flatten(2).scatter_add_(2, idx.flatten(2).expand(r.shape[0], -1, -1), r.flatten(2))
            rh = rh.view(r.shape[0], *h.shape[1:])
            return self._conv(stem.conv1, x0, self._relu_back(stem.canonizer_relu, a, rh))

        steps.append(stem_back)
        for stage in (body.res2, body.res3, body.res4, body.res5):
            for blk in stage:
                y, back = self._block(blk, y)
                steps.append(back)
        out = self.net.input_proj(y)
        feat = y
        steps.append(lambda r, feat=feat: self._conv(self.net.input_proj, feat, r))
        return out, steps

    def _block(self, blk: nn.Module, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if isinstance(blk, BasicBlock):
            convs, relus = [blk.conv1, blk.conv2], [blk.canonizer_relu1]
        elif isinstance(blk, BottleneckBlock):
            convs, relus = [blk.conv1, blk.conv2, blk.conv3], [blk.canonizer_relu1, blk.canonizer_relu2]
        else:
            raise NotImplementedError(f"block {type(blk).__name__}")
        ins, pres = [], []
        h = x
        for i, conv in enumerate(convs):
            ins.append(h)
            a = conv(h)
            if i < len(relus):
                pres.append(a)
                h = F.relu(a)
            else:
                h = a
        ident = blk.shortcut(x) if blk.shortcut is not None else x
        parts = torch.stack([ident, h], dim=-1)
        s = blk.canonizer_sum(parts)
        y = F.relu(s)

        def back(r: Tensor) -> Tensor:
            r = self._relu_back(blk.canonizer_relu, s, r)
            r_ident, r_main = self._sum_back(blk.canonizer_sum, parts, s, r)
            for i in range(len(convs) - 1, -1, -1):
                r_main = self._conv(convs[i], ins[i], r_main)
                if i > 0:
                    r_main = self._relu_back(relus[i - 1], pres[i - 1], r_main)
            r_x = self._conv(blk.shortcut, x, r_ident) if blk.shortcut is not None else r_ident
            return r_main + r_x

        return y, back
