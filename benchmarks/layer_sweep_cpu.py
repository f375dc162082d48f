"""The thesis-shaped workload on one image batch: every encoder layer x all features from one cache.

lrp_ray: one forward, then relevance for layers 0..L-1 x all features (per-token maps are built once
per layer and shared by every target layer above it). Batched autograd: one forward retaining the
graph up to the last layer, then ``is_grads_batched`` backwards from every layer's output (timed on
``--autograd-features`` per layer, extrapolated). The seed's way: a full forward and backward per
(layer, feature) (timed on one feature per layer, extrapolated).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import encoder_all_outputs, seed_way, tokens  # noqa: E402
from benchmarks.common import PeakRSS, images, machine, r50_model, write  # noqa: E402
from lrp_ray.lrp import EngineConfig, LrpEngine  # noqa: E402
from lrp_ray.models import preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--autograd-features", type=int, default=32)
    ap.add_argument("--name", default="layer_sweep_cpu")
    args = ap.parse_args(argv)
    model = r50_model()
    batch = preprocess(images(args.images), model.cfg)
    n_layers = len(model.transformer.encoder.layers)
    feats = list(range(args.features))
    eng = LrpEngine(model, EngineConfig(epsilon=0.0, device="cpu"))
    rss = PeakRSS()
    with rss.measure() as mem:
        t0 = time.perf_counter()
        cache = eng.forward(batch)
        for layer in range(n_layers):
            eng.relevance(cache, "encoder", layer, feats)
        t_eng = time.perf_counter() - t0
    del cache
    # batched autograd: one forward with every layer's output, backwards per layer
    t0 = time.perf_counter()
    with torch.no_grad():
        src, pos, mask = eng.encoder_inputs(batch)
    x0, p, kpm = tokens(src, pos, mask)
    x0 = x0.detach().requires_grad_(True)
    outs = encoder_all_outputs(model.transformer, x0, p, kpm)
    t_ag_fwd = time.perf_counter() - t0
    t_ag = t_ag_fwd
    k = args.autograd_features
    for y in outs:
        g = torch.zeros(k, *y.shape)
        g[torch.arange(k), :, :, torch.arange(k)] = (~kpm).float()
        t1 = time.perf_counter()
        torch.autograd.grad(y, x0, grad_outputs=g, is_grads_batched=True, retain_graph=True)
        t_ag += (time.perf_counter() - t1) * args.features / k
    del outs
    t_seed = 0.0
    for layer in range(n_layers):
        t1 = time.perf_counter()
        seed_way(eng, model, batch, layer, feats[:1])
        t_seed += (time.perf_counter() - t1) * args.features
    nmaps = n_layers * args.features * args.images
    row = {"layers": n_layers, "features": args.features, "images": args.images, "maps": nmaps,
           "engine_s": t_eng, "autograd_s": t_ag, "autograd_forward_s": t_ag_fwd, "seed_s": t_seed,
           "engine_maps_per_s": nmaps / t_eng, "speedup_vs_autograd": t_ag / t_eng,
           "speedup_vs_seed": t_seed / t_eng, "engine_peak_rss_gb": mem["peak"] / 1e9}
    print(row)
    info = machine()
    cmd = "python benchmarks/layer_sweep_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = "\n".join([
        "### Every encoder layer x all features from one cache (cpu, fp32)", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}  ",
        f"Command: `{cmd.strip()}`  ",
        f"DETR-R50 shape (random weights), {args.images} images 480x640, layers 0-{n_layers - 1} x "
        f"{args.features} features = {nmaps} maps, cp rules, epsilon 0.", "",
        "| engine s | maps/s | batched autograd s (extrap.) | seed s (extrap.) | vs autograd | vs seed "
        "| engine peak RSS GB |", "|---|---|---|---|---|---|---|",
        f"| {t_eng:.0f} | {nmaps / t_eng:.1f} | {t_ag:.0f} | {t_seed:.0f} | **{t_ag / t_eng:.2f}x** "
        f"| **{t_seed / t_eng:.0f}x** | {mem['peak'] / 1e9:.1f} |", ""])
    write(args.name, {"machine": info, "command": cmd, "row": row}, table)
    return row


if __name__ == "__main__":
    main()
