"""Engine vs the seed's way vs batched autograd, same process, model, images and targets.

The seed's way: per feature, a full model forward (backbone + encoder + decoder) and an autograd
backward from the target to the encoder input. The batched-autograd alternative: one forward, then
``is_grads_batched`` backwards over feature chunks (its forward is timed once, its backward per
feature). lrp_ray: one forward into the cache, then the vectorised propagation. All three compute cp
relevance (epsilon 0) and are checked to agree.

Per-feature costs of the baselines are independent of the feature, so the slow seed way is timed on
``--seed-features`` features and reported per feature (and extrapolated to all features).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import autograd_forward, batched_autograd, seed_way  # noqa: E402
from benchmarks.common import PeakRSS, images, machine, r50_model, write  # noqa: E402
from lrp_ray.lrp import EngineConfig, LrpEngine  # noqa: E402
from lrp_ray.models import preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="5", help="encoder layers, comma separated (default: 5)")
    ap.add_argument("--features", type=int, default=256, help="features per layer (default: 256 = all)")
    ap.add_argument("--images", type=int, default=4, help="images per batch (default: 4)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--seed-features", type=int, default=2, help="features timed the seed's way (default 2)")
    ap.add_argument("--autograd-features", type=int, default=64, help="features timed by batched autograd")
    ap.add_argument("--chunk", type=int, default=32, help="features per propagation (engine and autograd)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--name", default="engine_vs_seed_cpu", help="result file name under benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = r50_model()
    imgs = images(args.images, args.height, args.width)
    batch = preprocess(imgs, model.cfg)
    rss = PeakRSS()
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        feats = list(range(args.features))
        eng = LrpEngine(model, EngineConfig(epsilon=0.0, device=args.device, precision=args.precision))
        eng_ref = LrpEngine(model, EngineConfig(epsilon=0.0, device=args.device))
        # warm-up (allocator, kernels)
        eng.relevance(eng.forward(preprocess(imgs[:1], model.cfg)), "encoder", layer, feats[:4], chunk=4)
        with rss.measure() as m_eng:
            t0 = time.perf_counter()
            cache = eng.forward(batch)
            t_fwd = time.perf_counter() - t0
            res = eng.relevance(cache, "encoder", layer, feats, chunk=args.chunk)
            t_eng = time.perf_counter() - t0
        # the same at the engine's default epsilon (what a sweep runs; not comparable to eps-0 autograd)
        eng_eps = LrpEngine(model, EngineConfig(device=args.device, precision=args.precision))
        t0 = time.perf_counter()
        eng_eps.relevance(eng_eps.forward(batch), "encoder", layer, feats, chunk=args.chunk)
        t_eng_eps = time.perf_counter() - t0
        del eng_eps
        with rss.measure() as m_seed:
            t0 = time.perf_counter()
            seed_maps = seed_way(eng_ref, model, batch, layer, feats[: args.seed_features])
            t_seed = (time.perf_counter() - t0) / args.seed_features
        n_ag = min(args.autograd_features, args.features)
        with rss.measure() as m_ag:
            t0 = time.perf_counter()
            fwd = autograd_forward(eng_ref, batch, layer)
            t_ag_fwd = time.perf_counter() - t0
            ag_maps = batched_autograd(eng_ref, batch, layer, feats[:n_ag], chunk=args.chunk, forward=fwd)
            t_ag = (time.perf_counter() - t0 - t_ag_fwd) / n_ag
            del fwd
        gh, gw = res.token_maps.shape[-2:]
        eng_maps = torch.as_tensor(res.token_maps).flatten(2)
        ref = seed_maps.float()
        err_seed = float((eng_maps[:, : args.seed_features] - ref).abs().max() / ref.abs().max())
        err_ag = float((eng_maps[:, :n_ag] - ag_maps.float()).abs().max() / ag_maps.abs().max())
        nmaps = args.features * args.images
        row = {
            "layer": layer, "features": args.features, "images": args.images, "tokens": gh * gw,
            "engine_s": t_eng, "engine_forward_s": t_fwd, "engine_maps_per_s": nmaps / t_eng,
            "engine_default_eps_s": t_eng_eps, "default_eps": EngineConfig().epsilon,
            "seed_s_per_feature": t_seed, "seed_s_all_features": t_seed * args.features,
            "seed_maps_per_s": args.images / t_seed,
            "autograd_forward_s": t_ag_fwd, "autograd_s_per_feature": t_ag,
            "autograd_s_all_features": t_ag_fwd + t_ag * args.features,
            "autograd_maps_per_s": nmaps / (t_ag_fwd + t_ag * args.features),
            "speedup_vs_seed": t_seed * args.features / t_eng,
            "speedup_vs_autograd": (t_ag_fwd + t_ag * args.features) / t_eng,
            "max_rel_diff_vs_seed": err_seed, "max_rel_diff_vs_autograd": err_ag,
            "peak_rss_gb": {"engine": m_eng["peak"] / 1e9, "seed": m_seed["peak"] / 1e9,
                            "autograd": m_ag["peak"] / 1e9},
            "cache_mb": cache.nbytes / 1e6,
        }
        rows.append(row)
        print(row, flush=True)
    cmd = "python benchmarks/engine_vs_seed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    lines = [f"### Engine vs seed vs batched autograd ({args.device}, {args.precision})", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}  ",
             f"Command: `{cmd.strip()}`  ",
             f"DETR-R50 shape (random weights), {args.images} images {args.height}x{args.width}, "
             f"{args.features} features, cp rules, epsilon 0; the last column: the engine at its default "
             f"epsilon ({EngineConfig().epsilon:g}), what sweeps run.", "",
             "| layer | tokens | engine s (fwd s) | seed s (per feature) | autograd s (per feature) "
             "| engine maps/s | seed maps/s | autograd maps/s | vs seed | vs autograd | agree (rel) "
             "| peak RSS GB engine/seed/autograd | cache MB | engine s, default eps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['tokens']} | {r['engine_s']:.1f} ({r['engine_forward_s']:.1f}) "
            f"| {r['seed_s_all_features']:.0f} ({r['seed_s_per_feature']:.2f}) "
            f"| {r['autograd_s_all_features']:.1f} ({r['autograd_s_per_feature']:.3f}) "
            f"| {r['engine_maps_per_s']:.1f} | {r['seed_maps_per_s']:.2f} | {r['autograd_maps_per_s']:.1f} "
            f"| **{r['speedup_vs_seed']:.1f}x** | **{r['speedup_vs_autograd']:.2f}x** "
            f"| {max(r['max_rel_diff_vs_seed'], r['max_rel_diff_vs_autograd']):.1e} "
            f"| {r['peak_rss_gb']['engine']:.1f}/{r['peak_rss_gb']['seed']:.1f}/"
            f"{r['peak_rss_gb']['autograd']:.1f} | {r['cache_mb']:.0f} | {r['engine_default_eps_s']:.1f} |")
    write(args.name, {"machine": info, "command": cmd, "rows": rows}, "\n".join(lines) + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    main()
