"""detectron2-named ResNet backbone for DETR, with the padding mask of DETR's detectron2 wrapper.

Parameter names follow detectron2 (``stem.conv1``, ``res2.0.conv1``, ``res2.0.conv1.norm``,
``res2.0.shortcut`` ...), so that ``detr.backbone.0.backbone.*`` keys of a detectron2 checkpoint load
as they are. Only ``res5`` is computed and returned (DETR uses nothing else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .position_encoding import PositionEmbeddingSine

__all__ = [
    "FrozenBatchNorm2d", "Conv2d", "BasicBlock", "BottleneckBlock", "BasicStem", "ResNet",
    "MaskedBackbone", "Joiner", "NestedTensor", "ImageList", "build_resnet", "image_sizes_from_mask",
]

BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}


@dataclass
class NestedTensor:
    """Tensor with its padding mask (DETR reference convention: ``.tensors``, ``.mask``, ``.decompose()``)."""

    tensors: Tensor
    mask: Tensor

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask


@dataclass
class ImageList:
    """detectron2 ``ImageList``-like: padded batch ``.tensor`` and unpadded ``.image_sizes`` (h, w)."""

    tensor: Tensor
    image_sizes: list[tuple[int, int]]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (detectron2's, eps 1e-5).

    All four tensors are buffers (``weight``, ``bias``, ``running_mean``, ``running_var``);
    ``num_batches_tracked`` in a checkpoint is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class Conv2d(nn.Conv2d):
    """Bias-free convolution followed by its ``.norm`` (detectron2's ``Conv2d(..., norm=...)``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)
        # detectron2's c2_msra_fill: Kaiming normal, fan_out, relu.
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7 stride-2 conv + FrozenBN + relu + 3x3 stride-2 max-pool (padding 1)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 7, stride=2, padding=3)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34) with an optional 1x1 projection ``shortcut``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride) \
            if in_channels != out_channels else None
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + identity)


class BottleneckBlock(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck (ResNet-50+); ``stride_in_1x1`` puts the stride in the first conv."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, stride_in_1x1: bool = False, dilation: int = 1) -> None:
        super().__init__()
        self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride) \
            if in_channels != out_channels else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, 1, stride=s1)
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, 3, stride=s3, padding=dilation,
                            dilation=dilation, groups=num_groups)
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + identity)


class ResNet(nn.Module):
    """detectron2-named ResNet: ``stem``, ``res2`` .. ``res5``; ``forward`` returns res5 only.

    ``out_channels`` and ``stride`` (32, or 16 with RES5_DILATION 2) describe the res5 map.
    """

    def __init__(self, depth: int = 50, stem_out_channels: int = 64, res2_out_channels: int = 256,
                 width_per_group: int = 64, num_groups: int = 1, stride_in_1x1: bool = False,
                 res5_dilation: int = 1) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
        if res5_dilation == 2 and depth < 50:
            raise ValueError("res5_dilation 2 needs a bottleneck ResNet (depth >= 50)")
        self.depth = depth
        self.stem = BasicStem(3, stem_out_channels)
        in_ch, out_ch = stem_out_channels, res2_out_channels
        bottleneck = num_groups * width_per_group
        stride_total = 4
        for idx, n_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            stage = idx + 2
            dilation = res5_dilation if stage == 5 else 1
            first_stride = 1 if idx == 0 or (stage == 5 and dilation == 2) else 2
            stride_total *= first_stride
            blocks: list[nn.Module] = []
            for b in range(n_blocks):
                stride = first_stride if b == 0 else 1
                if depth >= 50:
                    blocks.append(BottleneckBlock(in_ch, out_ch, bottleneck, stride, num_groups,
                                                  stride_in_1x1, dilation))
                else:
                    blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            self.add_module(f"res{stage}", nn.Sequential(*blocks))
            out_ch *= 2
            bottleneck *= 2
        self.out_channels = in_ch
        self.stride = stride_total

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in (self.res2, self.res3, self.res4, self.res5):
            x = stage(x)
        return x


def build_resnet(cfg: Any) -> ResNet:
    """ResNet from a :class:`~lrp_ray.models.config.DetrConfig`."""
    return ResNet(cfg.resnet_depth, cfg.stem_out_channels, cfg.res2_out_channels, cfg.width_per_group,
                  cfg.num_groups, cfg.stride_in_1x1, cfg.res5_dilation)


def image_sizes_from_mask(pad_mask: Tensor) -> list[tuple[int, int]]:
    """Unpadded (h, w) of each image from a [B,H,W] padding mask (True = padding; images top-left)."""
    valid = ~pad_mask.bool()
    hs = valid.any(dim=2).sum(dim=1).tolist()
    ws = valid.any(dim=1).sum(dim=1).tolist()
    return [(int(h), int(w)) for h, w in zip(hs, ws, strict=True)]


def feature_mask(image_sizes: list[tuple[int, int]], shape: tuple[int, int], stride: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """[B,h,w] bool mask, False inside ``ceil(H/stride) x ceil(W/stride)`` of each image (detectron2 DETR)."""
    h, w = shape
    mask = torch.ones((len(image_sizes), h, w), dtype=torch.bool, device=device)
    for i, (ih, iw) in enumerate(image_sizes):
        mask[i, : math.ceil(ih / stride), : math.ceil(iw / stride)] = False
    return mask


class MaskedBackbone(nn.Module):
    """The ResNet (``.backbone``) plus the feature-map padding mask, as DETR's detectron2 wrapper."""

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_channels = backbone.out_channels
        self.stride = backbone.stride

    def features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """(res5 [B,C,h,w], mask [B,h,w]) for a padded batch and each image's unpadded size."""
        feat = self.backbone(images)
        return feat, feature_mask(image_sizes, tuple(feat.shape[-2:]), self.stride, feat.device)

    def forward(self, images: Any) -> list[NestedTensor]:
        """``images``: ImageList-like (``.tensor``, ``.image_sizes``) or NestedTensor-like (``.tensors``,
        ``.mask``). Returns ``[NestedTensor(res5, mask)]``."""
        if hasattr(images, "image_sizes"):
            tensor, sizes = images.tensor, [tuple(map(int, s)) for s in images.image_sizes]
        else:
            tensor, sizes = images.tensors, image_sizes_from_mask(images.mask)
        feat, mask = self.features(tensor, sizes)
        return [NestedTensor(feat, mask)]


class Joiner(nn.Sequential):
    """``[MaskedBackbone, PositionEmbeddingSine]``: returns (features, positions) as DETR's Joiner."""

    def __init__(self, backbone: MaskedBackbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Any) -> tuple[list[NestedTensor], list[Tensor]]:  # type: ignore[override]
        features = self[0](images)
        pos = [self[1](f).to(f.tensors.dtype) for f in features]
        return features, pos
