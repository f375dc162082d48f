"""The backbone backward: relevance at the input projection's output -> relevance of every input pixel.

One forward of ``input_proj(backbone(image))`` and one backward for K targets at once, under a zennit
composite with our canonizers. For our (detectron2-named) ResNet the network is walked explicitly
(:mod:`.walk`): each rule's modified forwards once per image, its gradient products for all K targets in
one batched transposed convolution. Other layouts go through autograd with zennit's hooks and the targets
as a batch dimension of the backward only (``is_grads_batched``). LRP rules are linear in the upstream
relevance, so both equal K separate zennit backwards (``tests/test_pixels.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .canonizers import backbone_canonizers
from .composites import CompositeSpec, pixel_box, resolve_composite
from .walk import WalkPlan, walkable

__all__ = ["PixelNet", "BackbonePropagator", "find_body", "DEFAULT_BACKWARD_BUDGET_BYTES"]

DEFAULT_BACKWARD_BUDGET_BYTES = 4 << 30
"""Nominal bytes per vectorised backward that size the target chunks (a fixed constant, never the
machine's memory, so chunking and numbers depend on the request only)."""


class _LastFeature(nn.Module):
    """A body returning a dict/list of feature maps (torchvision IntermediateLayerGetter) -> the last."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        if isinstance(out, dict):
            out = list(out.values())[-1]
        elif isinstance(out, (list, tuple)):
            out = out[-1]
        return getattr(out, "tensors", out)


def find_body(detr: nn.Module) -> nn.Module:
    """The module mapping images [B,3,H,W] to the feature map that ``input_proj`` reads.

    Ours/detectron2's: ``backbone[0].backbone`` (a ResNet returning res5); DETR's reference code:
    ``backbone[0].body`` (returns a dict, the last entry is used). Raises ValueError otherwise."""
    bb = getattr(detr, "backbone", None)
    first = bb[0] if isinstance(bb, nn.Sequential) and len(bb) > 0 else bb
    for name in ("backbone", "body"):
        body = getattr(first, name, None)
        if isinstance(body, nn.Module):
            return body if name == "backbone" else _LastFeature(body)
    raise ValueError(f"cannot find the CNN of {type(detr).__name__}.backbone: expected backbone[0].backbone "
                     "(detectron2 / lrp_ray) or backbone[0].body (DETR reference)")


class PixelNet(nn.Module):
    """``input_proj(body(images))``: the part of a DETR from pixels to the transformer's input tokens."""

    def __init__(self, body: nn.Module, input_proj: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.input_proj = input_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.input_proj(self.body(x))


def _check(y: Tensor, up: Tensor, reference: Tensor | None) -> None:
    """The upstream relevance fits the backbone's output, and the output reproduces ``reference``."""
    if tuple(y.shape[1:]) != tuple(up.shape[1:]):
        raise ValueError(f"upstream relevance {tuple(up.shape[1:])} does not fit the backbone's "
                         f"output {tuple(y.shape[1:])}")
    if reference is not None:
        ref = reference.to(y)
        err = float((y[0].detach() - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        if err > 1e-3:
            raise ValueError(f"the backbone does not reproduce the engine's tokens (relative error "
                             f"{err:.2e}): another model or an unsupported backbone layout")


class BackbonePropagator:
    """Pixel relevance of a DETR's backbone under one zennit composite, for many targets per backward.

    Works on its own float copy of the backbone and input projection (``dtype``, ``device``); the model
    passed in is not modified. ``cfg`` (pixel mean/std) gives the value box of box rules.
    """

    def __init__(self, detr: nn.Module, input_proj: nn.Module | None = None,
                 composite: str | CompositeSpec = "EpsilonPlusFlat", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", cfg: Any = None,
                 budget_bytes: int = DEFAULT_BACKWARD_BUDGET_BYTES, walk: bool | None = None) -> None:
        self.spec = resolve_composite(composite)
        self.dtype, self.device = dtype, torch.device(device)
        proj = input_proj if input_proj is not None else detr.input_proj
        self.net = PixelNet(copy.deepcopy(find_body(detr)), copy.deepcopy(proj)).to(self.device, dtype).eval()
        self.net.requires_grad_(False)
        low, high = pixel_box(cfg if cfg is not None else getattr(detr, "cfg", None), dtype)
        self.low, self.high = low.to(self.device), high.to(self.device)
        self.budget_bytes = int(budget_bytes)
        self.walk = walkable(self.net) if walk is None else bool(walk)
        """Explicit vectorised walk (:mod:`.walk`, our ResNet layout) or autograd with batched gradients."""

    def identity(self) -> dict[str, Any]:
        """What decides the numbers (composite, its parameters, zennit version, dtype, chunk budget)."""
        return {**self.spec.identity(), "pixel_dtype": str(self.dtype).removeprefix("torch."),
                "pixel_budget_bytes": self.budget_bytes, "pixel_path": "walk" if self.walk else "autograd"}

    def composite(self):
        """A fresh zennit composite (with our canonizers) for one forward/backward."""
        return self.spec.build(backbone_canonizers(), self.low, self.high)

    @torch.no_grad()
    def _walk(self, x: Tensor, up: Tensor, step: int, reference: Tensor | None) -> Tensor:
        out = []
        with WalkPlan(self.net, self.composite()) as plan:
            y, steps = plan.forward(x)
            _check(y, up, reference)
            for i in range(0, int(up.shape[0]), step):
                r = up[i:i + step]
                for back in reversed(steps):
                    r = back(r)
                out.append(r)
        if not out:
            return torch.zeros(0, *x.shape[1:], dtype=self.dtype, device=self.device)
        return torch.cat(out, 0)

    def bytes_per_target(self, h: int, w: int) -> int:
        """Estimated peak bytes one target adds to a backward of an ``h`` x ``w`` image: a few carriers of
        the largest activation (≈ 16·h·w values in a ResNet: 64 ch at 1/2 or 256 at 1/4) per layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        widest = max(m.out_channels for m in self.net.modules() if isinstance(m, nn.Conv2d))
        per = max(16 * h * w, widest * (h // 32 + 1) * (w // 32 + 1))
        return int(8 * per * elem)

    def targets_per_backward(self, h: int, w: int) -> int:
        """Targets per vectorised backward under the fixed budget (>= 1)."""
        return max(1, self.budget_bytes // self.bytes_per_target(h, w))

    def relevance(self, image: Tensor, upstream: Tensor, chunk: int | None = None,
                  reference: Tensor | None = None) -> Tensor:
        """Pixel relevance [K, 3, H, W] of one image ``image`` [1|3, H, W] (unpadded, normalised) for ``K``
        upstream relevances ``upstream`` [K, d, h, w] at the input projection's output.

        Targets go through the backward ``chunk`` at a time (default :meth:`targets_per_backward`).
        ``reference`` [d, h, w]: the tokens the relevance was computed on (the engine's); a backbone that
        does not reproduce them raises ValueError (wrong body found, or another model)."""
        x = image.reshape(1, *image.shape[-3:]).to(self.device, self.dtype)
        up = upstream.to(self.device, self.dtype)
        k = int(up.shape[0])
        step = int(chunk) if chunk else self.targets_per_backward(int(x.shape[-2]), int(x.shape[-1]))
        if self.walk:
            return self._walk(x, up, step, reference)
        out = []
        with self.composite().context(self.net) as net, torch.enable_grad():
            x = x.requires_grad_(True)
            y = net(x)
            _check(y, up, reference)
            for i in range(0, k, step):
                g = up[i:i + step].unsqueeze(1)                                    # [k, 1, d, h, w]
                (r,) = torch.autograd.grad(y, x, g, retain_graph=i + step < k, is_grads_batched=True)
                out.append(r[:, 0].detach())
        if not out:
            return torch.zeros(0, *x.shape[1:], dtype=self.dtype, device=self.device)
        return torch.cat(out, 0)
