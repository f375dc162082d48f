"""Pixel vs token maps on the demo's held-out scenes: pointing game and pixel deletion.

Target (as :mod:`lrp_ray.demo.faithfulness`): on each held-out scene with a car, the query with the
highest car probability and its matched ground-truth car box; the explained scalar is that query's car
logit (``engine.detection_relevance`` with the pair (query, car)). Its token map (the engine's) and its
pixel map (:mod:`lrp_ray.pixels`, ``--composite``) are compared on the original image grid, the token map
spread uniformly over the pixels of each token's 32x32 input patch (sum-preserving):

- pointing game: the maximum of the map lies in the car box (token: the centre of the top token's patch;
  pixel: the top pixel); ``energy``: the share of the map's positive relevance inside the box;
- deletion: pixels of the original image are replaced by the dataset mean colour (0 after normalisation)
  in order of decreasing relevance (or in random orders), the scene is preprocessed and run through the
  whole model again, and the query's car logit read off; curve ``1 + (logit - logit_0) / |logit_0|`` over
  the deleted fraction, summarised by its area (trapezoids; smaller = more faithful).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine  # noqa: E402
from lrp_ray.demo.faithfulness import car_scenes, car_targets, load_demo_model  # noqa: E402
from lrp_ray.demo.scenes import CAR, HELDOUT_START  # noqa: E402
from lrp_ray.lrp import EngineConfig, LrpEngine  # noqa: E402
from lrp_ray.models import preprocess  # noqa: E402
from lrp_ray.pixels import detection_pixel_maps, to_image_grid  # noqa: E402

FRACTIONS = np.array([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5])


def token_to_pixels(token_map: np.ndarray, input_hw: tuple[int, int], image_hw: tuple[int, int],
                    stride: int = 32) -> np.ndarray:
    """A token map spread uniformly over each token's input patch, then onto the original grid."""
    h, w = input_hw
    spread = np.kron(token_map, np.ones((stride, stride))) / stride**2
    return to_image_grid(spread[:h, :w], image_hw, None)


def _in_box(i: float, j: float, box: np.ndarray) -> bool:
    x0, y0, x1, y1 = box
    return bool(x0 <= j <= x1 and y0 <= i <= y1)


def pointing(m: np.ndarray, box: np.ndarray, centre_of_patch: float | None = None) -> tuple[bool, float]:
    """(max in box, positive share in box) of a map on the original grid (``centre_of_patch``: the map is
    blocky; use the centre of the top block, of that many original pixels per side)."""
    i, j = np.unravel_index(int(np.argmax(m)), m.shape)
    if centre_of_patch:
        i0, j0 = np.argwhere(m == m[i, j]).min(0)
        i, j = i0 + centre_of_patch / 2, j0 + centre_of_patch / 2
    else:
        i, j = i + 0.5, j + 0.5
    pos = np.clip(m, 0, None)
    x0, y0, x1, y1 = np.round(box).astype(int)
    inside = pos[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)].sum()
    return _in_box(i, j, box), float(inside / pos.sum()) if pos.sum() > 0 else 0.0


@torch.no_grad()
def deletion(model, image: np.ndarray, order: np.ndarray, query: int) -> np.ndarray:
    """The car logit of ``query`` after deleting the first ``FRACTIONS`` of ``order`` (flat pixel ids)."""
    cfg = model.cfg
    mean = np.asarray(cfg.pixel_mean, dtype=np.float64)
    if cfg.input_format == "BGR":
        mean = mean[::-1]
    imgs = []
    n = order.size
    for f in FRACTIONS:
        im = image.astype(np.float64).copy().reshape(-1, 3)
        im[order[: int(round(f * n))]] = mean
        imgs.append(np.clip(np.round(im), 0, 255).astype(np.uint8).reshape(image.shape))
    batch = preprocess(imgs, cfg)
    out = model(batch.tensor, batch.mask)["pred_logits"][:, query, CAR].double().numpy()
    return 1 + (out - out[0]) / max(abs(out[0]), 1e-12)


def area(curve: np.ndarray) -> float:
    return float(((curve[1:] + curve[:-1]) / 2 * np.diff(FRACTIONS)).sum() / FRACTIONS[-1])


def run(n: int, composite: str, n_random: int, start: int = HELDOUT_START) -> dict:
    model = load_demo_model().eval()
    engine = LrpEngine(model, EngineConfig(device="cpu"))
    targets = car_targets(model, car_scenes(n, start))
    rng = np.random.default_rng(0)
    rows = []
    t0 = time.perf_counter()
    for t in targets:
        img = t.scene.image
        batch = preprocess([img], model.cfg)
        cache = engine.forward(batch)
        dets = engine.select_detections(cache, [(t.query, CAR)])
        rel = engine.detection_relevance(cache, dets)
        vh, vw = rel.valid_hw[0]
        tok = token_to_pixels(rel.token_maps[0, 0, :vh, :vw], batch.input_sizes[0], t.scene.size)
        pix = detection_pixel_maps(engine, cache, batch, dets, composite, max_side=None).pixel_map(0, 0)
        patch = 32 * t.scene.size[0] / batch.input_sizes[0][0]
        hit_t, en_t = pointing(tok, t.car_box, patch)
        hit_p, en_p = pointing(pix, t.car_box)
        order_t = np.lexsort((np.arange(tok.size), -tok.ravel()))
        order_p = np.lexsort((np.arange(pix.size), -pix.ravel()))
        c_t, c_p = deletion(model, img, order_t, t.query), deletion(model, img, order_p, t.query)
        c_r = np.mean([deletion(model, img, rng.permutation(pix.size), t.query) for _ in range(n_random)], 0)
        rows.append({"scene": t.scene.index, "query": t.query, "iou": t.iou, "hit_token": hit_t,
                     "hit_pixel": hit_p, "energy_token": en_t, "energy_pixel": en_p,
                     "auc_token": area(c_t), "auc_pixel": area(c_p), "auc_random": area(c_r),
                     "curve_token": c_t.tolist(), "curve_pixel": c_p.tolist(), "curve_random": c_r.tolist(),
                     "conservation": float(pix.sum() / max(abs(tok.sum()), 1e-12))})
    secs = time.perf_counter() - t0
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    summary = {"n": len(rows), "composite": composite, "pointing_token": mean("hit_token"),
               "pointing_pixel": mean("hit_pixel"), "energy_token": mean("energy_token"),
               "energy_pixel": mean("energy_pixel"), "auc_token": mean("auc_token"),
               "auc_pixel": mean("auc_pixel"), "auc_random": mean("auc_random"),
               "pixel_beats_token_auc": float(np.mean([r["auc_pixel"] < r["auc_token"] for r in rows])),
               "mean_curve_token": np.mean([r["curve_token"] for r in rows], 0).tolist(),
               "mean_curve_pixel": np.mean([r["curve_pixel"] for r in rows], 0).tolist(),
               "mean_curve_random": np.mean([r["curve_random"] for r in rows], 0).tolist(),
               "fractions": FRACTIONS.tolist(), "seconds": secs}
    return {"summary": summary, "rows": rows}


def table(s: dict) -> str:
    return "\n".join([
        f"Held-out demo scenes with a car: {s['n']} (composite {s['composite']}).", "",
        "| map | pointing game (max in car box) | positive relevance in box | deletion AUC (lower = "
        "better) |",
        "|---|---|---|---|",
        f"| token (32x32 px input patches) | {s['pointing_token']:.1%} | {s['energy_token']:.1%} | "
        f"{s['auc_token']:.3f} |",
        f"| pixel ({s['composite']}) | {s['pointing_pixel']:.1%} | {s['energy_pixel']:.1%} | "
        f"{s['auc_pixel']:.3f} |",
        f"| random order | | | {s['auc_random']:.3f} |", "",
        f"Pixel deletion AUC below the token map's on {s['pixel_beats_token_auc']:.0%} of scenes. "
        f"Deleted fractions {s['fractions']}; mean curves: token "
        f"{np.round(s['mean_curve_token'], 3).tolist()}, "
        f"pixel {np.round(s['mean_curve_pixel'], 3).tolist()}, random "
        f"{np.round(s['mean_curve_random'], 3).tolist()}.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="6 scenes, 1 random order")
    ap.add_argument("--composite", default="EpsilonPlusFlat")
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(6 if args.quick else args.n, args.composite, 1 if args.quick else args.random)
    text = table(res["summary"])
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"pixels_faithfulness_{args.composite}"
        (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "args": vars(args), **res},
                                                         indent=1))
        (RESULTS / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
