"""DETR with the module names of DETR's reference code (as wrapped by its detectron2 project)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import Joiner, image_sizes_from_mask
from .transformer import Transformer

__all__ = ["DETR", "MLP"]


class MLP(nn.Module):
    """Stack of ``num_layers`` Linear layers with ReLU between (``layers.0`` .. ``layers.{n-1}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """DETR detector: backbone (Joiner), input_proj, transformer, query_embed, class/box heads.

    ``cfg`` is the :class:`~lrp_ray.models.config.DetrConfig` it was built from (or ``None``).
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 cfg: Any = None) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.cfg = cfg

    def encoder_inputs(self, images: Tensor, pad_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(images [B,3,H,W] normalised, pad_mask [B,H,W] True=pad) -> (src [B,d,h,w] after input_proj,
        pos [B,d,h,w], mask [B,h,w] bool)."""
        masked, position = self.backbone[0], self.backbone[1]
        feat, mask = masked.features(images, image_sizes_from_mask(pad_mask))
        pos = position(feat, mask).to(feat.dtype)
        return self.input_proj(feat), pos, mask

    def forward(self, images: Any, pad_mask: Tensor | None = None) -> dict[str, Any]:
        """DETR outputs for a padded batch (or an ``ImageBatch`` with ``.tensor`` / ``.mask``).

        Returns ``pred_logits`` [B,Q,C+1], ``pred_boxes`` [B,Q,4] (cx, cy, w, h in [0,1] of the unpadded
        input) and ``aux_outputs`` (the same for every decoder layer but the last).
        """
        if pad_mask is None:
            if not hasattr(images, "mask"):
                raise TypeError("DETR.forward needs pad_mask (or an ImageBatch)")
            images, pad_mask = images.tensor, images.mask
        src, pos, mask = self.encoder_inputs(images, pad_mask)
        hs = self.transformer(src, mask, self.query_embed.weight, pos)[0]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b}
                            for a, b in zip(logits[:-1], boxes[:-1], strict=True)],
        }
