"""The thesis-shaped workload on one image batch: every layer x all features from one cache.

lrp_ray: one forward, then relevance for every encoder layer (and with ``--modules both`` every decoder
layer on each image's top-1 query) x all features; per-token maps are built once per layer and shared by
every target above it. Batched autograd: one forward retaining the graph, then ``is_grads_batched``
backwards from every layer's output (timed on ``--autograd-features`` per layer, extrapolated). The
seed's way: a full forward and backward per (layer, feature) (timed on one feature per layer,
extrapolated). All compute cp relevance with epsilon 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import (  # noqa: E402
    decoder_all_outputs,
    encoder_all_outputs,
    seed_way,
    seed_way_decoder,
    tokens,
)
from benchmarks.common import PeakRSS, images, machine, r50_model, write  # noqa: E402
from lrp_ray.lrp import EngineConfig, LrpEngine  # noqa: E402
from lrp_ray.lrp.targets import select_queries  # noqa: E402
from lrp_ray.models import preprocess  # noqa: E402


def _batched_backward_s(y: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, features: int) -> float:
    """Seconds of is_grads_batched backwards for ``features`` features, timed on ``len(g)``."""
    t1 = time.perf_counter()
    torch.autograd.grad(y, x0, grad_outputs=g, is_grads_batched=True, retain_graph=True)
    return (time.perf_counter() - t1) * features / len(g)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--autograd-features", type=int, default=32)
    ap.add_argument("--modules", choices=("encoder", "both"), default="encoder",
                    help="encoder layers only, or also every decoder layer (top-1 query), as the thesis job")
    ap.add_argument("--name", default="layer_sweep_cpu")
    args = ap.parse_args(argv)
    model = r50_model()
    tr = model.transformer
    batch = preprocess(images(args.images), model.cfg)
    n_enc, n_dec = len(tr.encoder.layers), len(tr.decoder.layers)
    with_dec = args.modules == "both"
    feats = list(range(args.features))
    eng = LrpEngine(model, EngineConfig(epsilon=0.0, device="cpu"))
    rss = PeakRSS()
    with rss.measure() as mem:
        t0 = time.perf_counter()
        cache = eng.forward(batch)
        t_fwd = time.perf_counter() - t0
        for layer in range(n_enc):
            eng.relevance(cache, "encoder", layer, feats)
        t_enc = time.perf_counter() - t0
        for layer in range(n_dec if with_dec else 0):
            eng.relevance(cache, "decoder", layer, feats, queries="top1")
        t_eng = time.perf_counter() - t0
    queries = torch.as_tensor(select_queries(cache, "top1")[:, 0])
    del cache
    # batched autograd: one forward with every layer's output, backwards per layer
    k = args.autograd_features
    t0 = time.perf_counter()
    with torch.no_grad():
        src, pos, mask = eng.encoder_inputs(batch)
    x0, p, kpm = tokens(src, pos, mask)
    x0 = x0.detach().requires_grad_(True)
    outs = encoder_all_outputs(tr, x0, p, kpm)
    t_ag_fwd = time.perf_counter() - t0
    t_ag_enc = t_ag_fwd
    for y in outs:
        g = torch.zeros(k, *y.shape)
        g[torch.arange(k), :, :, torch.arange(k)] = (~kpm).float()
        t_ag_enc += _batched_backward_s(y, x0, g, args.features)
    t_ag_dec = 0.0
    if with_dec:
        t1 = time.perf_counter()
        douts = decoder_all_outputs(tr, outs[-1], p, kpm, model.query_embed.weight)
        t_ag_dec = time.perf_counter() - t1
        b_idx = torch.arange(len(queries))
        for y in douts:
            g = torch.zeros(k, *y.shape)
            for n in range(k):
                g[n, b_idx, queries, n] = 1.0
            t_ag_dec += _batched_backward_s(y, x0, g, args.features)
        del douts
    del outs
    t_seed_enc = sum(_timed(seed_way, eng, model, batch, layer, feats[:1]) for layer in range(n_enc))
    t_seed_dec = sum(_timed(seed_way_decoder, eng, batch, layer, feats[:1], queries)
                     for layer in range(n_dec if with_dec else 0))
    t_seed_enc, t_seed_dec = t_seed_enc * args.features, t_seed_dec * args.features
    per_layer_maps = args.features * args.images
    parts = [("encoder", n_enc, t_enc, t_ag_enc, t_seed_enc)]
    if with_dec:
        parts += [("decoder (top-1 query)", n_dec, t_eng - t_enc, t_ag_dec, t_seed_dec),
                  ("all", n_enc + n_dec, t_eng, t_ag_enc + t_ag_dec, t_seed_enc + t_seed_dec)]
    rows = [{"targets": name, "layers": nl, "features": args.features, "images": args.images,
             "maps": nl * per_layer_maps, "engine_s": te, "autograd_s": ta, "seed_s": ts,
             "engine_maps_per_s": nl * per_layer_maps / te, "speedup_vs_autograd": ta / te,
             "speedup_vs_seed": ts / te} for name, nl, te, ta, ts in parts]
    run = {"engine_forward_s": t_fwd, "autograd_forward_s": t_ag_fwd, "engine_peak_rss_gb": mem["peak"] / 1e9,
           "modules": args.modules}
    for r in rows:
        print(r)
    info = machine()
    cmd = "python benchmarks/layer_sweep_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "### Every layer x all features from one cache (cpu, fp32)", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}  ",
        f"Command: `{cmd.strip()}`  ",
        f"DETR-R50 shape (random weights), {args.images} images 480x640, {args.features} features per layer, "
        f"cp rules, epsilon 0. Engine forward {t_fwd:.1f} s (counted in the encoder row), engine peak RSS "
        f"{mem['peak'] / 1e9:.1f} GB.", "",
        "| targets | layers | maps | engine s | maps/s | batched autograd s (extrap.) | seed s (extrap.) "
        "| vs autograd | vs seed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['targets']} | {r['layers']} | {r['maps']} | {r['engine_s']:.0f} "
                     f"| {r['engine_maps_per_s']:.1f} | {r['autograd_s']:.0f} | {r['seed_s']:.0f} "
                     f"| **{r['speedup_vs_autograd']:.2f}x** | **{r['speedup_vs_seed']:.0f}x** |")
    write(args.name, {"machine": info, "command": cmd, "rows": rows, "run": run}, "\n".join(lines) + "\n")
    return {"rows": rows, "run": run}


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
