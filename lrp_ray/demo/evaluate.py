"""VOC-style average precision for the demo detector, on held-out generated scenes.

``average_precision`` is the PASCAL VOC (2010+) all-point interpolated AP at an IoU threshold: detections
of one class over all images sorted by score, greedily matched to the highest-IoU unmatched ground-truth
box of that class in the same image (IoU >= threshold), precision made monotone, area under the PR curve.

``evaluate_model`` runs exactly the user-facing inference path: ``lrp_ray.models.preprocess`` ->
``DETR.forward`` -> ``lrp_ray.models.detections``.

    python -m lrp_ray.demo.evaluate [--n 300] [--config ...] [--weights ...]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scenes import CLASS_NAMES, HELDOUT_START, generate_scene


@dataclass
class ImageDetections:
    boxes: np.ndarray   # [k, 4] xyxy pixels
    scores: np.ndarray  # [k]
    labels: np.ndarray  # [k]
    queries: np.ndarray | None = None  # [k] query index of each detection


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a [N,4]`` with every box in ``b [M,4]`` (xyxy)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def average_precision(dets: Sequence[ImageDetections], gt_boxes: Sequence[np.ndarray],
                      gt_labels: Sequence[np.ndarray], cls: int, iou_thr: float = 0.5) -> float:
    """All-point interpolated AP of class ``cls`` over a set of images."""
    n_gt = int(sum(int((np.asarray(lab) == cls).sum()) for lab in gt_labels))
    recs = []  # (score, image, box)
    for i, d in enumerate(dets):
        keep = np.asarray(d.labels) == cls
        for s, bx in zip(np.asarray(d.scores)[keep], np.asarray(d.boxes).reshape(-1, 4)[keep], strict=True):
            recs.append((float(s), i, bx))
    if n_gt == 0:
        return float("nan")
    if not recs:
        return 0.0
    recs.sort(key=lambda r: -r[0])
    used = [np.zeros(int((np.asarray(lab) == cls).sum()), dtype=bool) for lab in gt_labels]
    gts = [np.asarray(b).reshape(-1, 4)[np.asarray(lab) == cls]
           for b, lab in zip(gt_boxes, gt_labels, strict=True)]
    tp = np.zeros(len(recs))
    for k, (_, i, bx) in enumerate(recs):
        if len(gts[i]) == 0:
            continue
        ious = box_iou(bx[None], gts[i])[0]
        ious[used[i]] = -1.0
        j = int(np.argmax(ious))
        if ious[j] >= iou_thr:
            used[i][j] = True
            tp[k] = 1
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(recs) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for k in range(len(mpre) - 2, -1, -1):
        mpre[k] = max(mpre[k], mpre[k + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def heldout_scenes(n: int, start: int = HELDOUT_START):
    return [generate_scene(i) for i in range(start, start + n)]


def predict(model, cfg, images: Sequence[np.ndarray], batch_size: int = 16) -> list[ImageDetections]:
    """Detections through the models package's user-facing path (preprocess -> forward -> detections)."""
    import torch

    from lrp_ray.models import detections, preprocess

    out: list[ImageDetections] = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            chunk = list(images[s:s + batch_size])
            batch = preprocess(chunk, cfg)
            pred = model(batch.tensor, batch.mask)
            for d in detections(pred["pred_logits"], pred["pred_boxes"], batch.image_sizes):
                out.append(ImageDetections(boxes=np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4),
                                           scores=np.asarray(d["scores"], dtype=np.float64).reshape(-1),
                                           labels=np.asarray(d["labels"]).reshape(-1),
                                           queries=np.asarray(d["query"]).reshape(-1)))
    return out


def evaluate_model(model, cfg, n: int = 300, start: int = HELDOUT_START, scenes=None) -> dict[str, float]:
    """AP50 per class (and their mean) on ``n`` held-out scenes."""
    scenes = scenes if scenes is not None else heldout_scenes(n, start)
    dets = predict(model, cfg, [s.image for s in scenes])
    res = {}
    for c, name in enumerate(CLASS_NAMES):
        res[f"AP50_{name}"] = average_precision(dets, [s.boxes for s in scenes],
                                                [s.labels for s in scenes], c)
    res["mAP50"] = float(np.nanmean([res[f"AP50_{n}"] for n in CLASS_NAMES]))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    from lrp_ray.demo import demo_config_path, demo_weights_path
    from lrp_ray.models import build_model, load_config, load_weights

    ap = argparse.ArgumentParser(prog="python -m lrp_ray.demo.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="number of held-out scenes")
    ap.add_argument("--start", type=int, default=HELDOUT_START, help="first held-out scene index")
    ap.add_argument("--config", default=None)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    cfg = load_config(args.config or demo_config_path())
    model = build_model(cfg)
    load_weights(model, args.weights or demo_weights_path())
    print(json.dumps(evaluate_model(model, cfg, args.n, args.start), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
