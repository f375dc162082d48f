"""DETR training objective, written from the paper: Hungarian matching + set losses.

- Matching cost per (query, target): ``-w_class * p(target class) + w_l1 * L1(box) - w_giou * GIoU(box)``,
  solved per image with ``scipy.optimize.linear_sum_assignment``.
- Losses: cross-entropy over ``num_classes + 1`` logits (the last one is "no object", down-weighted by
  ``eos_coef``), L1 and generalised-IoU on the matched boxes (``cx, cy, w, h`` normalised to the image),
  each normalised by the number of target boxes in the batch.  The same losses on every decoder layer's
  output (auxiliary / deep supervision) are added, each with its own matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn import functional as F


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU between every box of ``a [N,4]`` and ``b [M,4]`` (xyxy) -> ``[N, M]``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


@dataclass
class Target:
    labels: Tensor  # [n] int64
    boxes: Tensor   # [n, 4] float32 cxcywh normalised to the image (0..1)


@dataclass
class LossWeights:
    cls: float = 1.0
    l1: float = 5.0
    giou: float = 2.0
    eos_coef: float = 0.1


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, targets: list[Target],
                    w: LossWeights) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (query indices, target indices) of the optimal one-to-one assignment."""
    out = []
    prob = logits.softmax(-1)
    for b, t in enumerate(targets):
        if len(t.labels) == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        cost_cls = -prob[b][:, t.labels]
        cost_l1 = torch.cdist(boxes[b], t.boxes, p=1)
        cost_giou = -pairwise_giou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(t.boxes))
        cost = w.cls * cost_cls + w.l1 * cost_l1 + w.giou * cost_giou
        qi, ti = linear_sum_assignment(cost.cpu().numpy())
        out.append((qi.astype(np.int64), ti.astype(np.int64)))
    return out


class SetCriterion:
    def __init__(self, num_classes: int, weights: LossWeights | None = None) -> None:
        self.num_classes = num_classes
        self.w = weights or LossWeights()
        self.class_weight = torch.ones(num_classes + 1)
        self.class_weight[-1] = self.w.eos_coef

    def single(self, logits: Tensor, boxes: Tensor, targets: list[Target],
               num_boxes: float) -> dict[str, Tensor]:
        match = hungarian_match(logits, boxes, targets, self.w)
        bsz, nq = logits.shape[:2]
        tgt_cls = torch.full((bsz, nq), self.num_classes, dtype=torch.long, device=logits.device)
        src_boxes, tgt_boxes = [], []
        for b, (qi, ti) in enumerate(match):
            if len(qi):
                tgt_cls[b, torch.as_tensor(qi)] = targets[b].labels[torch.as_tensor(ti)]
                src_boxes.append(boxes[b, torch.as_tensor(qi)])
                tgt_boxes.append(targets[b].boxes[torch.as_tensor(ti)])
        loss_ce = F.cross_entropy(logits.transpose(1, 2), tgt_cls, weight=self.class_weight.to(logits.device))
        if src_boxes:
            sb, tb = torch.cat(src_boxes), torch.cat(tgt_boxes)
            loss_l1 = F.l1_loss(sb, tb, reduction="sum") / num_boxes
            giou = torch.diag(pairwise_giou(box_cxcywh_to_xyxy(sb), box_cxcywh_to_xyxy(tb)))
            loss_giou = (1 - giou).sum() / num_boxes
        else:
            loss_l1 = loss_giou = boxes.sum() * 0.0
        return {"ce": loss_ce, "l1": loss_l1, "giou": loss_giou}

    def __call__(self, layer_logits: list[Tensor], layer_boxes: list[Tensor],
                 targets: list[Target]) -> tuple[Tensor, dict[str, float]]:
        """Total loss over all decoder layers (last layer + auxiliary ones) and a log dict (last layer)."""
        num_boxes = max(1.0, float(sum(len(t.labels) for t in targets)))
        total = layer_logits[0].new_zeros(())
        log: dict[str, float] = {}
        for i, (lg, bx) in enumerate(zip(layer_logits, layer_boxes, strict=True)):
            parts = self.single(lg, bx, targets, num_boxes)
            total = total + self.w.cls * parts["ce"] + self.w.l1 * parts["l1"] + self.w.giou * parts["giou"]
            if i == len(layer_logits) - 1:
                log = {k: float(v.detach()) for k, v in parts.items()}
        return total, log
