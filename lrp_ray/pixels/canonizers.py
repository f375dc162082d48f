"""zennit canonizers for the detectron2-named ResNet of :mod:`lrp_ray.models.backbone`.

zennit's own canonizers cover torchvision's layout (``bn1`` next to ``conv1``, ``nn.ReLU`` modules); ours
has ``Conv2d`` modules that apply their ``FrozenBatchNorm2d`` (``.norm``) inside ``forward``, functional
ReLUs and residual sums. :class:`FrozenNormMerge` folds each ``.norm`` into its convolution's weight and
bias (the convolution then skips it); :class:`ResidualSumCanonizer` gives stems and blocks a forward with
``nn.ReLU``/``nn.MaxPool2d`` modules and a zennit ``Sum`` for the residual addition, so that zennit's
composites assign them their rules (Pass, gradient, Norm). Both undo themselves on ``remove``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from zennit.canonizers import AttributeCanonizer, Canonizer
from zennit.layer import Sum
from zennit.torchvision import ResNetCanonizer

from ..models.backbone import BasicBlock, BasicStem, BottleneckBlock

__all__ = ["FrozenNormMerge", "ResidualSumCanonizer", "backbone_canonizers", "is_frozen_norm"]


def is_frozen_norm(m: Any) -> bool:
    """A frozen batch norm by its data (detectron2's, DETR's or ours): weight, bias, running stats, eps."""
    return (isinstance(m, nn.Module) and not isinstance(m, nn.modules.batchnorm._BatchNorm)
            and all(isinstance(getattr(m, k, None), Tensor) for k in ("weight", "bias", "running_mean",
                                                                        "running_var")))


class FrozenNormMerge(Canonizer):
    """Fold a convolution's own ``.norm`` (a frozen batch norm applied in its forward) into its weight and
    bias; the convolution's forward becomes the plain ``nn.Conv2d`` one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv: nn.Conv2d | None = None
        self.saved: tuple[Tensor, Tensor | None] | None = None

    def apply(self, root_module: nn.Module) -> list[FrozenNormMerge]:
        instances = []
        for m in root_module.modules():
            if isinstance(m, nn.Conv2d) and is_frozen_norm(getattr(m, "norm", None)):
                inst = FrozenNormMerge()
                inst.register(m)
                instances.append(inst)
        return instances

    def register(self, conv: nn.Conv2d) -> None:  # type: ignore[override]
        norm = conv.norm
        self.conv, self.saved = conv, (conv.weight, conv.bias)
        w = conv.weight.detach()
        scale = (norm.weight * (norm.running_var + float(getattr(norm, "eps", 1e-5))).rsqrt()).to(w.dtype)
        shift = norm.bias.to(w.dtype) - norm.running_mean.to(w.dtype) * scale
        bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
        conv.weight = nn.Parameter(w * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        conv.forward = nn.Conv2d.forward.__get__(conv)  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.conv is None or self.saved is None:
            return
        conv = self.conv
        del conv.forward
        conv.weight = self.saved[0]
        if self.saved[1] is None:
            conv.bias = None
        else:
            conv.bias = self.saved[1]
        self.conv = self.saved = None

    def copy(self) -> FrozenNormMerge:
        return FrozenNormMerge()


def _stem_forward(self: BasicStem, x: Tensor) -> Tensor:
    return self.canonizer_pool(self.canonizer_relu(self.conv1(x)))


def _basic_forward(self: BasicBlock, x: Tensor) -> Tensor:
    out = self.conv2(self.canonizer_relu1(self.conv1(x)))
    identity = self.shortcut(x) if self.shortcut is not None else x
    return self.canonizer_relu(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def _bottleneck_forward(self: BottleneckBlock, x: Tensor) -> Tensor:
    out = self.canonizer_relu1(self.conv1(x))
    out = self.canonizer_relu2(self.conv2(out))
    out = self.conv3(out)
    identity = self.shortcut(x) if self.shortcut is not None else x
    return self.canonizer_relu(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def _residual_attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
    """The forward and modules a stem or block of our ResNet gets (None for other modules)."""
    if isinstance(module, BasicStem):
        return {"forward": _stem_forward.__get__(module), "canonizer_relu": nn.ReLU(),
                "canonizer_pool": nn.MaxPool2d(kernel_size=3, stride=2, padding=1)}
    if isinstance(module, BasicBlock):
        return {"forward": _basic_forward.__get__(module), "canonizer_relu1": nn.ReLU(),
                "canonizer_relu": nn.ReLU(), "canonizer_sum": Sum()}
    if isinstance(module, BottleneckBlock):
        return {"forward": _bottleneck_forward.__get__(module), "canonizer_relu1": nn.ReLU(),
                "canonizer_relu2": nn.ReLU(), "canonizer_relu": nn.ReLU(), "canonizer_sum": Sum()}
    return None


class ResidualSumCanonizer(AttributeCanonizer):
    """Stems and residual blocks of our ResNet with module ReLUs, a module max-pool and a zennit ``Sum``."""

    def __init__(self) -> None:
        super().__init__(_residual_attributes)

    def copy(self) -> ResidualSumCanonizer:
        return ResidualSumCanonizer()


def backbone_canonizers() -> list[Canonizer]:
    """Ours for the detectron2-named ResNet, then zennit's for torchvision-layout ones (no-op on ours)."""
    return [FrozenNormMerge(), ResidualSumCanonizer(), ResNetCanonizer()]
