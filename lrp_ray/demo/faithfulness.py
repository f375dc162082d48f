"""Faithfulness checks of LRP on the demo model: pointing game and deletion curves.

    python -m lrp_ray.demo.faithfulness [--n 60] [--layer 2]

Target ("the query matched to a car"): on each held-out scene with at least one car, the query whose
prediction has the highest car probability (softmax over the classes + no-object, through the user-facing
``preprocess -> DETR.forward`` path); its matched car is the ground-truth car box with the largest IoU
with the query's predicted box. The explained scalar is a function of that query's output at decoder
layer ``layer`` (``transformer.decoder.layers[layer]``, before ``decoder.norm``); one
``explain(..., features="all", queries=[q])`` call gives every feature's activation and token map, and
the target's map is a combination of them (LRP is linear in the relevance it starts from):

- ``car_logit`` (default): the query's car logit, ``class_embed(decoder.norm(x))[car]`` -- what DETR
  scores the detection by at that layer -- with the LayerNorm scale held constant (as LRP does);
  see :func:`car_logit_weights`;
- ``max_activation``: the query's single feature with the largest activation.

- Pointing game: hit when the token with the largest relevance lies on the matched car: its cell (the
  ``stride x stride`` input patch the token stands for, in original-image pixels) overlaps the car box
  ("cell" rule, the token-resolution version of "the maximum falls in the box"); the stricter "centre"
  rule (the token's centre inside the box) is reported too.
- Deletion curve: tokens of the encoder input (``src`` after ``input_proj``, the tokens the maps are
  over) are set to zero in order of decreasing relevance, or in random orders, and the target is
  re-measured (backbone once, then the transformer on all deletion steps as one batch);
  the curve is ``1 + (target(k deleted) - target(0)) / |target(0)|`` (``target(k) / target(0)`` for a
  positive target) over the fraction of deleted tokens, summarised
  by its mean (area under the curve). Faithful maps give a smaller area than random orders.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .evaluate import box_iou
from .scenes import CAR, HELDOUT_START, Scene, generate_scene


@dataclass
class CarTarget:
    scene: Scene
    query: int
    car_prob: float
    pred_box: np.ndarray      # xyxy, original pixels
    car_box: np.ndarray       # matched ground-truth car box
    iou: float
    input_hw: tuple[int, int]


@dataclass
class Explained:
    target: CarTarget
    feature: int
    activation: float
    token_map: np.ndarray     # [grid_h, grid_w]
    all_maps_sum: np.ndarray  # sum of every feature's map (for reference)
    weights: np.ndarray | None = None  # target = weights . (layer output of the query)


@dataclass
class PointingResult:
    hits_cell: list[bool] = field(default_factory=list)
    hits_centre: list[bool] = field(default_factory=list)
    hits_sum_cell: list[bool] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)

    @property
    def cell_rate(self) -> float:
        return float(np.mean(self.hits_cell)) if self.hits_cell else float("nan")

    @property
    def centre_rate(self) -> float:
        return float(np.mean(self.hits_centre)) if self.hits_centre else float("nan")


def load_demo_model():
    from lrp_ray.models import load_model

    from . import demo_config_path, demo_weights_path

    return load_model(demo_config_path(), demo_weights_path())


def car_scenes(n: int, start: int = HELDOUT_START) -> list[Scene]:
    """The first ``n`` held-out scenes (from ``start``) with at least one car."""
    out, i = [], start
    while len(out) < n:
        sc = generate_scene(i)
        i += 1
        if (sc.labels == CAR).any():
            out.append(sc)
    return out


@torch.no_grad()
def car_targets(model, scenes: Sequence[Scene], batch_size: int = 16) -> list[CarTarget]:
    from lrp_ray.models import preprocess
    from lrp_ray.models.postprocess import box_cxcywh_to_xyxy

    cfg = model.cfg
    out = []
    model.eval()
    for s in range(0, len(scenes), batch_size):
        chunk = list(scenes[s:s + batch_size])
        batch = preprocess([c.image for c in chunk], cfg)
        pred = model(batch.tensor, batch.mask)
        prob = pred["pred_logits"].softmax(-1)[..., CAR]
        for b, sc in enumerate(chunk):
            q = int(prob[b].argmax())
            h, w = sc.size
            box = (box_cxcywh_to_xyxy(pred["pred_boxes"][b, q]) * torch.tensor([w, h, w, h])).numpy()
            cars = sc.boxes[sc.labels == CAR]
            ious = box_iou(box[None], cars)[0]
            j = int(np.argmax(ious))
            out.append(CarTarget(scene=sc, query=q, car_prob=float(prob[b, q]), pred_box=box, car_box=cars[j],
                                 iou=float(ious[j]), input_hw=tuple(batch.input_sizes[b])))
    return out


TARGETS = ("car_logit", "max_activation")


def car_logit_weights(model, layer_output: np.ndarray) -> np.ndarray:
    """Weights ``w`` with ``w . x = car logit - const`` at a decoder layer output ``x`` [d].

    DETR scores every decoder layer's output ``x`` by ``class_embed(decoder.norm(x))``; with the
    LayerNorm's scale ``sigma(x)`` held constant (as LRP's rules hold normalisers constant),
    ``logit_car = sum_f W_car,f * gamma_f * (x_f - mean(x)) / sigma + const``, i.e. ``w = (c - mean(c)) /
    sigma`` with ``c = W_car * gamma``. The relevance of that scalar is the same combination of the
    per-feature relevance maps (the propagation is linear in the starting relevance).
    """
    norm = model.transformer.decoder.norm
    x = np.asarray(layer_output, dtype=np.float64)
    sigma = float(np.sqrt(x.var() + norm.eps))
    c = model.class_embed.weight.detach().double().numpy()[CAR] * norm.weight.detach().double().numpy()
    return (c - c.mean()) / sigma


def explain_targets(model, targets: Sequence[CarTarget], layer: int, target: str = "car_logit",
                    engine=None) -> list[Explained]:
    """One ``explain(..., features="all", queries=[q])`` call per image; the map of the chosen target.

    ``target``: ``"car_logit"`` (the query's car logit, see :func:`car_logit_weights`) or
    ``"max_activation"`` (the query's feature with the largest activation at that layer).
    """
    from lrp_ray.api import engine_for, explain

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    engine = engine or engine_for(model, device="cpu")
    out = []
    for t in targets:
        df = explain(model, [t.scene.image], module="decoder", layer=layer, features="all",
                     queries=[t.query], engine=engine, batch_size=1)
        df = df[df["query"] == t.query].sort_values("feature")
        gh, gw = int(df["grid_h"].iloc[0]), int(df["grid_w"].iloc[0])
        maps = np.stack([np.asarray(m, dtype=np.float64).reshape(gh, gw) for m in df["token_map"]])
        acts = df["act_sum"].to_numpy(dtype=np.float64)  # the query's layer output, one value per feature
        if target == "car_logit":
            w = car_logit_weights(model, acts)
            feature, weights = -1, w
        else:
            feature = int(np.argmax(acts))
            weights = np.zeros_like(acts)
            weights[feature] = 1.0
        out.append(Explained(target=t, feature=feature, activation=float(weights @ acts),
                             token_map=np.tensordot(weights, maps, axes=1), all_maps_sum=maps.sum(0),
                             weights=weights))
    return out


def token_cell(i: int, j: int, image_hw: tuple[int, int], input_hw: tuple[int, int],
               stride: int = 32) -> tuple[float, float, float, float]:
    """xyxy (original pixels) of the input patch of token (row i, column j)."""
    sy = image_hw[0] / input_hw[0]
    sx = image_hw[1] / input_hw[1]
    return (j * stride * sx, i * stride * sy, min((j + 1) * stride * sx, image_hw[1]),
            min((i + 1) * stride * sy, image_hw[0]))


def point_hits(token_map: np.ndarray, box: np.ndarray, image_hw, input_hw,
               stride: int = 32) -> tuple[bool, bool]:
    """(cell rule, centre rule) hits of the map's maximum on ``box``."""
    i, j = np.unravel_index(int(np.argmax(token_map)), token_map.shape)
    x0, y0, x1, y1 = token_cell(int(i), int(j), image_hw, input_hw, stride)
    bx0, by0, bx1, by1 = (float(v) for v in box)
    cell = x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    centre = bx0 <= cx <= bx1 and by0 <= cy <= by1
    return bool(cell), bool(centre)


def pointing_game(explained: Sequence[Explained], stride: int = 32) -> PointingResult:
    res = PointingResult()
    for e in explained:
        t = e.target
        cell, centre = point_hits(e.token_map, t.car_box, t.scene.size, t.input_hw, stride)
        res.hits_cell.append(cell)
        res.hits_centre.append(centre)
        res.hits_sum_cell.append(point_hits(e.all_maps_sum, t.car_box, t.scene.size, t.input_hw, stride)[0])
        res.ious.append(t.iou)
    return res


@torch.no_grad()
def deletion_curves(model, e: Explained, layer: int, n_random: int = 5, steps: int = 10,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fractions, relevance-ordered curve, mean random-order curve) of one explained target."""
    from lrp_ray.models import preprocess

    t = e.target
    batch = preprocess([t.scene.image], model.cfg)
    src, pos, mask = model.encoder_inputs(batch.tensor, batch.mask)
    gh, gw = e.token_map.shape
    n_tok = gh * gw
    ks = sorted({int(round(x)) for x in np.linspace(0, n_tok, steps + 1)})
    rel_order = np.argsort(-e.token_map.ravel(), kind="stable")
    rng = np.random.default_rng([seed, t.scene.index])
    orders = [rel_order] + [rng.permutation(n_tok) for _ in range(n_random)]
    keeps = []
    for order in orders:
        for k in ks:
            keep = torch.ones(src.shape[-2:], dtype=src.dtype)
            idx = order[:k]
            rows, cols = np.unravel_index(idx, (gh, gw))
            keep[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = 0.0
            keeps.append(keep)
    keep = torch.stack(keeps)[:, None]                                    # [M,1,h,w]
    m = keep.shape[0]
    captured: list[torch.Tensor] = []
    hook = model.transformer.decoder.layers[layer].register_forward_hook(
        lambda mod, inp, out: captured.append(out))
    try:
        model.transformer(src.expand(m, -1, -1, -1) * keep, mask.expand(m, -1, -1), model.query_embed.weight,
                          pos.expand(m, -1, -1, -1))
    finally:
        hook.remove()
    w = torch.as_tensor(e.weights, dtype=captured[0].dtype)
    y = (captured[0][t.query] @ w).double().numpy()                      # [M] (sequence-first output)
    y = y.reshape(len(orders), len(ks))
    base = y[:, :1]
    # 1 + (target - initial) / |initial|: starts at 1 and falls as the target falls (= target / initial
    # for a positive target, and still meaningful for a negative one).
    curves = 1.0 + (y - base) / np.maximum(np.abs(base), 1e-12)
    fr = np.asarray(ks, dtype=np.float64) / n_tok
    return fr, curves[0], curves[1:].mean(0)


def run(n: int = 60, layer: int = 2, start: int = HELDOUT_START, deletion_n: int | None = None,
        model=None, target: str = "car_logit") -> dict:
    """Both checks on ``n`` held-out car scenes; a summary dict."""
    model = model or load_demo_model()
    layer = layer if layer >= 0 else len(model.transformer.decoder.layers) + layer
    targets = car_targets(model, car_scenes(n, start))
    explained = explain_targets(model, targets, layer, target)
    pg = pointing_game(explained)
    auc_rel, auc_rand = [], []
    for e in explained[: deletion_n or len(explained)]:
        _, rel, rand = deletion_curves(model, e, layer)
        auc_rel.append(float(np.mean(rel)))
        auc_rand.append(float(np.mean(rand)))
    return {
        "images": len(explained), "layer": layer, "target": target,
        "pointing_cell": pg.cell_rate, "pointing_centre": pg.centre_rate,
        "pointing_cell_sum_of_features": float(np.mean(pg.hits_sum_cell)),
        "query_box_iou_mean": float(np.mean(pg.ious)),
        "query_box_iou_ge_0.5": float(np.mean(np.asarray(pg.ious) >= 0.5)),
        "deletion_auc_relevance": float(np.mean(auc_rel)), "deletion_auc_random": float(np.mean(auc_rand)),
        "deletion_rel_below_random": float(np.mean(np.asarray(auc_rel) < np.asarray(auc_rand))),
        "features": [e.feature for e in explained],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrp_ray.demo.faithfulness",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--layer", type=int, default=-1, help="decoder layer (default: last)")
    ap.add_argument("--start", type=int, default=HELDOUT_START)
    ap.add_argument("--target", choices=TARGETS, default="car_logit")
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)
    res = run(args.n, args.layer, args.start, target=args.target)
    res["features"] = sorted(set(res["features"]))
    text = json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                       for k, v in res.items()}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
