"""DETR outputs -> per-image detections (as DETR's detectron2 wrapper at inference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["detections", "box_cxcywh_to_xyxy"]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def detections(pred_logits: Tensor, pred_boxes: Tensor, image_sizes: Sequence[tuple[int, int]],
               score_threshold: float = 0.0) -> list[dict[str, np.ndarray]]:
    """One dict per image with numpy ``scores`` [N], ``labels`` [N], ``boxes`` [N,4] (xyxy pixels of the
    ORIGINAL image, clipped to it as detectron2 does) and ``query`` [N] (query index), sorted by score.

    Scores and labels are the max over the softmax without the last (no-object) class.
    """
    if pred_logits.dim() != 3 or pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(f"expected pred_logits [B,Q,C+1] and pred_boxes [B,Q,4], got "
                         f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}")
    if len(image_sizes) != pred_logits.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {pred_logits.shape[0]}")
    prob = pred_logits.detach().float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    boxes = box_cxcywh_to_xyxy(pred_boxes.detach().float())
    out = []
    for i, (h, w) in enumerate(image_sizes):
        b = boxes[i] * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        s = scores[i].cpu().numpy()
        order = np.argsort(-s, kind="stable")
        order = order[s[order] >= score_threshold] if score_threshold > 0 else order
        out.append({
            "scores": s[order].astype(np.float32),
            "labels": labels[i].cpu().numpy()[order].astype(np.int64),
            "boxes": b.cpu().numpy()[order].astype(np.float32),
            "query": order.astype(np.int64),
        })
    return out
