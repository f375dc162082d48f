"""Pixel maps on the CPU: K targets of one image through input_proj + ResNet backbone, ours vs zennit.

Ours (:mod:`lrp_ray.pixels`): one forward of the backbone and one vectorised backward for the K targets
(zennit's rules, K as a batch dimension of every transposed convolution), then the sum-preserving
resampling to the original image grid. The obvious alternative: zennit as documented, one forward and one
backward per target under the same composite (fresh forward each, as zennit's attributors do). Both get
the same upstream relevance (the engine's [tokens x channels] relevance of encoder-layer features) on
the same image in the same process; maps are checked to agree. The baseline's rate is measured on
``min(K, --base-targets)`` targets (it is linear in K). Also reported: our autograd path (zennit's hooks
with batched gradients, the fallback for layouts the explicit walk does not know) and the peak RSS of
ours for the largest K (the image's backbone backward only; the process's baseline RSS is subtracted).

Cases: DETR-R50 shape (random weights) at 480x640, the bundled demo model (ResNet-18 x 12 channels; a
480x640 photo is resized to 224x298). ``--quick``: the demo model only, K = 1, 8, in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PeakRSS, images, machine, r50_model, write  # noqa: E402
from lrp_ray.lrp import EngineConfig, LrpEngine  # noqa: E402
from lrp_ray.models import load_model, preprocess  # noqa: E402
from lrp_ray.pixels import BackbonePropagator, to_image_grid  # noqa: E402

NAME = "pixels_cpu"


def _upstream(engine: LrpEngine, cache, k: int) -> torch.Tensor:
    """[K, d, h, w]: the engine's token x channel relevance of K features at the last encoder layer."""
    layer = len(engine.weights.encoder) - 1
    rel, _ = engine.token_relevance(cache, "encoder", layer, list(range(k)))
    gh, gw = cache.meta["grid"]
    vh, vw = cache.meta["valid_hw"][0]
    return rel[0].reshape(k, gh, gw, -1)[:, :vh, :vw].permute(0, 3, 1, 2).contiguous()


def _ours(prop: BackbonePropagator, x: torch.Tensor, up: torch.Tensor, size) -> np.ndarray:
    pix = prop.relevance(x, up).sum(1)
    return to_image_grid(pix.double().numpy(), size, 256)


def _zennit(prop: BackbonePropagator, x: torch.Tensor, up: torch.Tensor, size) -> np.ndarray:
    out = []
    for k in range(up.shape[0]):
        xi = x[None].clone().requires_grad_(True)
        with prop.composite().context(prop.net) as net:
            (g,) = torch.autograd.grad(net(xi), xi, up[k:k + 1])
        out.append(to_image_grid(g[0].sum(0).double().numpy(), size, 256))
    return np.stack(out)


def _timed(fn, *args) -> tuple[float, object, float]:
    """(wall seconds, result, CPU seconds of this process: all its threads)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t, out, time.process_time() - c


def run_case(label: str, model, ks: list[int], base_targets: int, composite: str, repeat: int,
             autograd: bool) -> list[dict]:
    engine = LrpEngine(model, EngineConfig(device="cpu"))
    batch = preprocess(images(1, 480, 640), model.cfg)
    cache = engine.forward(batch)
    size = batch.image_sizes[0]
    h, w = batch.input_sizes[0]
    x = batch.tensor[0, :, :h, :w]
    ours = BackbonePropagator(model, composite=composite)
    hooks = BackbonePropagator(model, composite=composite, walk=False)
    warm = _upstream(engine, cache, max(ks))
    _ours(ours, x, warm, size)        # warm-up of both (allocator, kernels) at the largest size first
    _zennit(ours, x, warm[:1], size)
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        up = _upstream(engine, cache, k)
        t_tokens = time.perf_counter() - t0
        nb = min(k, base_targets)
        t_o, t_b, c_o, c_b = [], [], [], []
        for _ in range(repeat):   # alternate ours and the baseline: a loaded machine slows both alike
            t, maps, c = _timed(_ours, ours, x, up, size)
            t_o.append(t)
            c_o.append(c)
            t, maps_b, c = _timed(_zennit, ours, x, up[:nb], size)
            t_b.append(t)
            c_b.append(c)
        t_ours, t_base = float(np.median(t_o)), float(np.median(t_b))
        cpu_ours, cpu_base = float(np.median(c_o)), float(np.median(c_b))
        t_hooks, maps_h, _ = _timed(_ours, hooks, x, up[:nb], size) if autograd \
            else (float("nan"), maps[:nb], 0.0)
        diff = float(np.abs(maps[:nb] - maps_b).max() / max(np.abs(maps_b).max(), 1e-30))
        diff_h = float(np.abs(maps[:nb] - maps_h).max() / max(np.abs(maps_h).max(), 1e-30))
        rows.append({
            "case": label, "input": f"{h}x{w}", "K": k, "composite": composite,
            "ours_s": t_ours, "ours_maps_per_s": k / t_ours,
            "zennit_per_target_maps_per_s": nb / t_base, "autograd_batched_maps_per_s": nb / t_hooks,
            "speedup_vs_zennit": (k / t_ours) / (nb / t_base), "transformer_tokens_s": t_tokens,
            "ours_cpu_s": cpu_ours, "zennit_cpu_s_per_target": cpu_base / nb,
            "speedup_vs_zennit_cpu_time": (k / cpu_ours) / (nb / cpu_base),
            "ours_cpu_s_all": c_o, "zennit_cpu_s_all": c_b,
            "max_rel_diff_vs_zennit": diff, "max_rel_diff_vs_autograd": diff_h,
            "map_abs_max": float(np.abs(maps).max()), "ours_s_all": t_o, "zennit_s_all": t_b,
            "targets_per_backward": ours.targets_per_backward(h, w),
        })
        print(rows[-1], flush=True)
    kmax = max(ks)
    up = _upstream(engine, cache, kmax)
    meter = PeakRSS()
    with meter.measure() as st:
        _ours(ours, x, up, size)
    rows[-1]["peak_rss_delta_mb"] = (st["peak"] - st["start"]) / 2**20
    rows[-1]["peak_rss_mb"] = st["peak"] / 2**20
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo model only, K = 1, 8 (seconds)")
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--base-targets", type=int, default=2, help="targets the per-target baseline runs")
    ap.add_argument("--composite", default="EpsilonPlusFlat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternating runs of ours and the baseline (median)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--autograd", action="store_true", help="also time the autograd path on DETR-R50")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [1, 8] if args.quick else [int(k) for k in args.ks.split(",")]
    from lrp_ray.demo import demo_config_path, demo_weights_path

    cases = [("demo (R18x12)", load_model(demo_config_path(), demo_weights_path()))]
    if not args.quick:
        cases.insert(0, ("DETR-R50 (random)", r50_model()))
    rows = []
    for label, model in cases:
        rows += run_case(label, model, ks, args.base_targets, args.composite, args.repeat,
                         args.autograd or args.quick or label.startswith("demo"))
    lines = ["| model | input | K | ours maps/s | zennit 1 backward/target maps/s | speed-up (wall) | "
             "speed-up (CPU time) | autograd-batched maps/s | max rel diff | peak RSS (MB, K max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_rss_delta_mb']:.0f} (+{r['peak_rss_mb']:.0f} total)" if "peak_rss_mb" in r else ""
        lines.append(f"| {r['case']} | {r['input']} | {r['K']} | {r['ours_maps_per_s']:.3g} | "
                     f"{r['zennit_per_target_maps_per_s']:.3g} | {r['speedup_vs_zennit']:.1f}x | "
                     f"{r['speedup_vs_zennit_cpu_time']:.1f}x | "
                     f"{r['autograd_batched_maps_per_s']:.3g} | {r['max_rel_diff_vs_zennit']:.1e} | {peak} |")
    table = "\n".join(lines) + "\n"
    if args.no_write or args.quick:
        print(table)
    else:
        write(NAME, {"machine": machine(), "args": vars(args), "rows": rows}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
