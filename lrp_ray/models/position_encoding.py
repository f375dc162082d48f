"""Sine position encoding of DETR (reference-code semantics)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding from cumulative sums over the non-padded positions.

    ``num_pos_feats`` features for y followed by ``num_pos_feats`` for x (so ``2 * num_pos_feats`` =
    hidden dim). With ``normalize`` the cumulative sums are divided by their last entry (+1e-6) and
    multiplied by ``scale`` (2π by default), exactly as DETR does.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale given but normalize is False")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Any, mask: Tensor | None = None) -> Tensor:
        """``x``: a NestedTensor-like object (``.tensors``, ``.mask``) or a feature map [B,C,h,w] with
        ``mask`` [B,h,w] (True = padding; ``None``: no padding).
        Returns [B, 2*num_pos_feats, h, w] float32."""
        if mask is None:
            if hasattr(x, "mask"):
                mask = x.mask
                x = x.tensors
            else:
                mask = torch.zeros((x.shape[0], *x.shape[-2:]), dtype=torch.bool, device=x.device)
        assert mask is not None
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
