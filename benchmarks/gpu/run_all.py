"""Every GPU check and measurement of lrp_ray in one run (one H200, under 10 minutes).

Parts, in order, each guarded (a failure is recorded and the next part runs) and each writing
``OUT/<part>.json`` and ``OUT/<part>.md`` (OUT: ``--out``, else ``$OUT``, else benchmarks/results/gpu):

1. ``correctness``: the engine on the GPU (fp32, bf16) against the engine on the CPU in fp64, same model and
   same encoder input tokens, cp and attnlrp rules, encoder and decoder targets: max relative error.
2. ``propagation``: DETR-R50 (random weights) at 800x1066 inputs (850 encoder tokens), fp32 and bf16,
   K = 32, 64, 128, 256 features per propagation, encoder and decoder (top1) targets at layer 5, with and
   without per-token FFN maps: time (synchronised, after warm-up), peak GPU memory, analytic matmul FLOPs
   (cross-checked with FlopCounterMode on a small case), TFLOP/s against this card's dense matmul peak
   measured in the same run (8192^3 bf16 and fp32 products).
3. ``baselines``: engine vs the seed's way (full forward + backward per feature) vs batched autograd
   (``benchmarks/baselines.py``), encoder layer 5, all 256 features, 4 images, with agreement.
4. ``sweep`` (only when ``import ray`` works): the thesis sweep through the CLI (``jobs/thesis_sweep.yaml``:
   6 encoder + 6 decoder layers x 256 features, decoder queries as the job says) over 131 generated
   images, on this machine's GPU, end to end, timed; stopped (SIGINT, resumable) when the time budget
   runs out, with the rate reached so far.

A global budget (``--budget``, seconds from start) skips the remaining parts when less than
``--min-left`` seconds are left. ``--smoke`` runs every part at tiny size on the CPU (a couple of minutes).

Needs torch, numpy, pyarrow, pandas, pillow, pyyaml, pydantic (lrp_ray's config); Ray only for part 4.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu.flops import (  # noqa: E402
    active_ffn_units,
    counted_flops,
    cross_check,
    ffn_map_build_flops,
    maps_layers,
    propagation_flops,
    shapes_of,
)
from benchmarks.sweep_cpu import TINY  # noqa: E402

PARTS = ("correctness", "propagation", "baselines", "sweep")

SMALL_WIDE: dict[str, object] = {
    "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STEM_OUT_CHANNELS": 16, "MODEL.RESNETS.RES2_OUT_CHANNELS": 16,
    "INPUT.MIN_SIZE_TEST": 320, "INPUT.MAX_SIZE_TEST": 512,
}
"""The correctness model: DETR-R50's transformer (256 wide, 8 heads, FFN 2048, 6+6 layers, 100 queries) on a
narrow ResNet-18, 320 px images: real-width relevance paths, cheap enough for an fp64 CPU reference."""

R50_800 = {"INPUT.MIN_SIZE_TEST": 800, "INPUT.MAX_SIZE_TEST": 1333}


# ------------------------------------------------------------------------------------------- plumbing

class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.device = torch.device(args.device)
        self.smoke = args.smoke

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return None

    def allocated_gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 1e9
        return None


def log(msg: str) -> None:
    print(msg, flush=True)


def machine_info(ctx: Ctx) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(ctx.device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1),
                    sm_count=p.multi_processor_count, cuda=torch.version.cuda)
    return info


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else None
    except Exception:
        return None


def timed(ctx: Ctx, fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    """Median seconds of ``reps`` synchronised calls."""
    times = []
    for _ in range(max(1, reps)):
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def rel_err(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max() if a.size else 0.0)


def make_model(overrides: dict[str, object], seed: int = 0):
    from lrp_ray.models import DetrConfig, build_model

    torch.manual_seed(seed)
    return build_model(DetrConfig().with_overrides(overrides))


def rand_images(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def write_part(ctx: Ctx, name: str, payload: dict, md: str) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (ctx.out / f"{name}.md").write_text(md)


# ------------------------------------------------------------------------------------------- 1. correctness

def part_correctness(ctx: Ctx) -> tuple[dict, str]:
    from lrp_ray.lrp import EngineConfig, LrpEngine
    from lrp_ray.models import preprocess

    a = ctx.args
    overrides = TINY if ctx.smoke else SMALL_WIDE
    model = make_model(overrides)
    imgs = rand_images(2, 64, 96) if ctx.smoke else rand_images(2, 240, 320)
    batch = preprocess(imgs, model.cfg)
    feats = list(range(4 if ctx.smoke else 16))
    layer_enc = len(model.transformer.encoder.layers) - 1
    layer_dec = len(model.transformer.decoder.layers) - 1
    queries = [0, 1]
    precisions = ["fp32", "bf16"]
    limits = {"fp32": a.fp32_tol, "bf16": a.bf16_tol}
    rows = []
    for rules in ("cp", "attnlrp"):
        ref = LrpEngine(copy.deepcopy(model), EngineConfig(rules=rules, precision="fp64", device="cpu"))
        src, pos, mask = ref.encoder_inputs(batch)   # the same encoder input tokens for every engine
        cref = ref.forward_tokens(src, pos, mask)
        k = len(feats)
        want = {"encoder": ref.relevance(cref, "encoder", layer_enc, feats, chunk=k),
                "decoder": ref.relevance(cref, "decoder", layer_dec, feats, queries=queries, chunk=k)}
        for prec in precisions:
            eng = LrpEngine(copy.deepcopy(model),
                            EngineConfig(rules=rules, precision=prec, device=str(ctx.device)))
            c = eng.forward_tokens(src, pos, mask)
            for module, layer in (("encoder", layer_enc), ("decoder", layer_dec)):
                got = eng.relevance(c, module, layer, feats, queries=queries if module == "decoder" else None,
                                    chunk=len(feats))
                w = want[module]
                errs = {k: rel_err(getattr(got, k), getattr(w, k))
                        for k in ("token_maps", "channel_relevance", "target_relevance", "input_relevance")}
                worst = max(errs.values())
                rows.append({"rules": rules, "precision": prec, "device": str(ctx.device), "module": module,
                             "layer": layer, "targets": int(got.features.shape[0]), **errs,
                             "max_rel_err": worst, "tolerance": limits[prec],
                             "pass": bool(worst <= limits[prec])})
                log(f"  {rules} {prec} {module}: max rel err {worst:.2e} (tolerance {limits[prec]:g})")
            del eng, c
            free(ctx)
    d = model.cfg.hidden_dim
    what = ("tiny DETR" if ctx.smoke else
            "DETR-R50 transformer (d 256, FFN 2048, 6+6 layers, 100 queries) on a narrow ResNet-18")
    md = ["### 1. Engine on " + str(ctx.device) + " vs engine on CPU in fp64", "",
          f"Model: {what} (random weights, hidden {d}), 2 images, the same encoder input tokens for both "
          f"engines; {len(feats)} features; decoder queries {queries}. Error: max |a - b| / max |b|.", "",
          "| rules | precision | module | layer | targets | token maps | channel rel. | target rel. "
          "| input rel. | tolerance | pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['rules']} | {r['precision']} | {r['module']} | {r['layer']} | {r['targets']} "
                  f"| {r['token_maps']:.2e} | {r['channel_relevance']:.2e} | {r['target_relevance']:.2e} "
                  f"| {r['input_relevance']:.2e} | {r['tolerance']:g} | {'yes' if r['pass'] else '**NO**'} |")
    ok = all(r["pass"] for r in rows)
    return {"rows": rows, "all_pass": ok}, "\n".join(md) + "\n"


# ------------------------------------------------------------------------------------------- 2. propagation

def matmul_peak(ctx: Ctx, dtype: torch.dtype, n: int, warmup: int = 3, reps: int = 10) -> dict:
    torch.manual_seed(0)
    x = torch.randn(n, n, device=ctx.device, dtype=dtype)
    y = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(warmup):
        x @ y
    ctx.sync()
    t = time.perf_counter()
    for _ in range(reps):
        x @ y
    ctx.sync()
    dt = (time.perf_counter() - t) / reps
    del x, y
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": dt,
            "tflops": 2 * n ** 3 / dt / 1e12}


def part_propagation(ctx: Ctx) -> tuple[dict, str]:
    from lrp_ray.lrp import EngineConfig, LrpEngine
    from lrp_ray.models import preprocess

    a = ctx.args
    res: dict[str, Any] = {}
    # dense matmul peak of this device, in this run
    n = 256 if ctx.smoke else a.peak_n
    res["peak"] = {p: matmul_peak(ctx, dt, n)
                   for p, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    pk = res["peak"]
    log(f"  matmul peak: bf16 {pk['bf16']['tflops']:.1f}, fp32 {pk['fp32']['tflops']:.1f} TFLOP/s")
    # FLOP counter cross-check on a small case (tiny model, CPU)
    tiny = make_model(TINY)
    teng = LrpEngine(tiny, EngineConfig(device="cpu", ffn_maps=False))
    tcache = teng.forward(preprocess(rand_images(2, 64, 96), tiny.cfg))
    res["flop_check"] = cross_check(teng, tcache, layer=1, features=4)
    for r in res["flop_check"]:
        log(f"  flop check {r['case']}: analytic {r.get('analytic')} counted {r.get('counted')}")
    del tiny, teng, tcache
    # the model
    overrides = TINY if ctx.smoke else R50_800
    model = make_model(overrides)
    h, w = (64, 96) if ctx.smoke else (a.height, a.width)
    nimg = 2 if ctx.smoke else a.batch
    batch = preprocess(rand_images(nimg, h, w), model.cfg)
    d = model.cfg.hidden_dim
    ks = [k for k in ([4, 8, 32] if ctx.smoke else [int(x) for x in a.ks.split(",")]) if k <= d]
    layer = min(a.layer, len(model.transformer.encoder.layers) - 1, len(model.transformer.decoder.layers) - 1)
    modules = [m for m in a.modules.split(",") if m]
    rows = []
    for prec in a.precisions.split(","):
        for mode in ("direct", "ffn_maps"):
            if ctx.left() < a.min_left:
                log("  (budget: skipping the remaining propagation configurations)")
                res["truncated"] = True
                break
            eng = LrpEngine(copy.deepcopy(model), EngineConfig(
                precision=prec, device=str(ctx.device), ffn_maps=(mode == "ffn_maps"),
                chunk_budget_bytes=1 << 42))
            ctx.sync()
            t = time.perf_counter()
            cache = eng.forward(batch)
            ctx.sync()
            t_fwd = time.perf_counter() - t
            s = shapes_of(eng, cache)
            for module in modules:
                q = "top1" if module == "decoder" else None
                first_s = None
                if mode == "ffn_maps":
                    # steady state: let the engine build its per-token maps (it does for calls with enough
                    # targets), timing the call that builds them
                    need = s["enc_layers"] if module == "decoder" else layer + 1
                    for _ in range(8):
                        if maps_layers(cache) >= need:
                            break
                        ctx.sync()
                        t = time.perf_counter()
                        eng.relevance(cache, module, layer, list(range(max(ks))), queries=q, chunk=max(ks))
                        ctx.sync()
                        first_s = (first_s or 0.0) + time.perf_counter() - t
                for k in ks:
                    feats = list(range(k))
                    call = functools.partial(eng.relevance, cache, module, layer, feats, queries=q, chunk=k)
                    call()  # warm-up (allocator, kernels)
                    ctx.reset_peak()
                    before = ctx.allocated_gb()
                    med, times = timed(ctx, call, a.reps)
                    peak = ctx.peak_gb()
                    n_layers = layer + 1 if module == "encoder" else s["enc_layers"]
                    # the engine takes its per-token maps for calls of enough targets only
                    uses_maps = mode == "ffn_maps" and k >= eng.maps_min_targets
                    used = min(maps_layers(cache), n_layers) if uses_maps else 0
                    kw = dict(B=s["B"], T=s["T"], d=s["d"], dff=s["dff"], H=s["H"], N=k,
                              layers=layer + 1, module=module, Q=s["Q"], enc_layers=s["enc_layers"])
                    f_direct = propagation_flops(**kw, ffn_maps=False, detail=True)
                    f_maps = propagation_flops(**kw, ffn_maps=True, detail=True)
                    mix = {key: f_direct[key] + (f_maps[key] - f_direct[key]) * used / n_layers
                           for key in ("total", "counted_equiv")}
                    flops = mix["total"]
                    counted = counted_flops(call) if a.count_flops else None  # one more call, counted
                    peak_tf = pk["bf16" if prec in ("bf16", "fp16") else "fp32"]["tflops"]
                    tf = flops / med / 1e12
                    row = {"precision": prec, "mode": mode, "module": module, "layer": layer, "K": k,
                           "B": s["B"], "T": s["T"], "seconds": med, "times": times,
                           "maps_per_s": s["B"] * k / med,
                           "flops": flops, "flops_counted_equiv": mix["counted_equiv"],
                           "flops_counted": counted,
                           "count_rel_diff": abs(counted - mix["counted_equiv"]) / max(1, counted)
                           if counted is not None else None,
                           "flops_direct_equiv": f_direct["total"], "maps_layers": used,
                           "tflops": tf, "pct_of_peak": 100 * tf / peak_tf if peak_tf else None,
                           "tflops_direct_equiv": f_direct["total"] / med / 1e12,
                           "peak_gb": peak, "extra_gb": (peak - before) if peak is not None else None,
                           "forward_s": t_fwd, "maps_build_call_s": first_s,
                           "maps_build_flops": ffn_map_build_flops(
                               s["B"], s["T"], s["d"], s["dff"], n_layers,
                               active_ffn_units(cache, n_layers) if eng.device.type == "cpu" else None,
                               eps_vectors=eng.config.epsilon > 0) if used else 0}
                    rows.append(row)
                    log(f"  {prec} {mode} {module} K={k}: {med * 1e3:.1f} ms, {row['maps_per_s']:.0f} "
                        f"maps/s, {tf:.2f} TFLOP/s ({fmt(row['pct_of_peak'], '.1f')}% of peak), "
                        f"peak {fmt(peak, '.2f')} GB")
            del eng, cache
            free(ctx)
    res["rows"] = rows
    res["model"] = {"overrides": overrides, "images": nimg, "height": h, "width": w,
                    "tokens": rows[0]["T"] if rows else None}
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    md = ["### 2. Propagation speed on " + str(ctx.device), "",
          f"{'tiny DETR' if ctx.smoke else 'DETR-R50 (random weights)'}, {nimg} images {h}x{w} "
          f"({res['model']['tokens']} tokens), layer {layer}, cp rules, K features per propagation "
          "(decoder: top1 query). Time: median of "
          f"{a.reps} synchronised calls after a warm-up (`LrpEngine.relevance`, results copied to host "
          f"included). Dense matmul peak measured here ({pk['bf16']['n']}^3): bf16 "
          f"{pk['bf16']['tflops']:.1f}, fp32 {pk['fp32']['tflops']:.1f} TFLOP/s (TF32 matmul {tf32}). "
          "`direct`: ffn_maps=False; `ffn_maps`: default config in steady state (per-token FFN maps built; "
          "FLOPs are the work done, `direct-equiv.` the FLOPs the direct path would need for the same "
          "maps). GFLOP: analytic (`benchmarks/gpu/flops.py`); `counter`: FlopCounterMode on the same call, "
          "relative difference to the analytic count without matrix-vector products (it does not count "
          "those).", "",
          "| precision | mode | module | K | ms | maps/s | GFLOP | counter | TFLOP/s | % of peak "
          "| direct-equiv. TFLOP/s | peak GB (extra) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['precision']} | {r['mode']} | {r['module']} | {r['K']} | {r['seconds'] * 1e3:.1f} "
                  f"| {r['maps_per_s']:.0f} | {r['flops'] / 1e9:.4g} | {fmt(r['count_rel_diff'], '.0e')} "
                  f"| {r['tflops']:.3g} | {fmt(r['pct_of_peak'], '.1f')} | {r['tflops_direct_equiv']:.3g} "
                  f"| {fmt(r['peak_gb'], '.2f')} ({fmt(r['extra_gb'], '.2f')}) |")
    md += ["", "FLOP counter vs FlopCounterMode (small case):", "",
           "| case | analytic | counted | rel. diff |", "|---|---|---|---|"]
    for r in res["flop_check"]:
        md.append(f"| {r['case']} | {r.get('analytic', 'n/a')} | {r.get('counted', r.get('error', 'n/a'))} "
                  f"| {fmt(r.get('rel_diff'), '.1e')} |")
    return res, "\n".join(md) + "\n"


# ------------------------------------------------------------------------------------------- 3. baselines

def part_baselines(ctx: Ctx) -> tuple[dict, str]:
    from benchmarks.baselines import autograd_forward, batched_autograd, seed_way
    from lrp_ray.lrp import EngineConfig, LrpEngine
    from lrp_ray.models import preprocess

    a = ctx.args
    overrides = TINY if ctx.smoke else R50_800
    model = make_model(overrides)
    h, w = (64, 96) if ctx.smoke else (a.height, a.width)
    nimg = 2 if ctx.smoke else a.batch
    imgs = rand_images(nimg, h, w)
    batch = preprocess(imgs, model.cfg)
    d = model.cfg.hidden_dim
    layer = min(a.layer, len(model.transformer.encoder.layers) - 1)
    feats = list(range(d))
    n_seed = min(1 if ctx.smoke else a.seed_features, d)
    n_ag = min(a.autograd_features, d)
    dev = str(ctx.device)
    eng = LrpEngine(model, EngineConfig(epsilon=0.0, device=dev, chunk_budget_bytes=1 << 42))
    eng_ref = LrpEngine(model, EngineConfig(epsilon=0.0, device=dev))
    chunk = min(a.engine_chunk, d)
    batch1 = preprocess(imgs[:1], model.cfg)   # (outside the device context below: preprocess makes tensors)
    warm = eng.forward(batch1)
    eng.relevance(warm, "encoder", layer, feats, chunk=chunk)  # warm-up (allocator, kernels, maps build)
    del warm
    free(ctx)
    ctx.reset_peak()
    ctx.sync()
    t = time.perf_counter()
    cache = eng.forward(batch)
    ctx.sync()
    t_fwd = time.perf_counter() - t
    res_e = eng.relevance(cache, "encoder", layer, feats, chunk=chunk)
    ctx.sync()
    t_eng = time.perf_counter() - t
    mem_eng = ctx.peak_gb()
    del cache
    free(ctx)
    log(f"  engine: {t_eng:.2f}s for {d} features x {nimg} images (forward {t_fwd:.2f}s)")
    with torch.device(dev):  # the baselines build their tensors without naming a device
        seed_way(eng_ref, model, batch1, layer, feats[:1])  # warm-up
        ctx.reset_peak()
        ctx.sync()
        t = time.perf_counter()
        seed_maps = seed_way(eng_ref, model, batch, layer, feats[:n_seed])
        ctx.sync()
        t_seed = (time.perf_counter() - t) / n_seed
        mem_seed = ctx.peak_gb()
        seed_maps = seed_maps.detach().float().cpu()
        free(ctx)
        log(f"  seed way: {t_seed:.3f}s per feature ({n_seed} timed)")
        batched_autograd(eng_ref, batch1, layer, feats[:2], chunk=2)  # warm-up
        ctx.reset_peak()
        ctx.sync()
        t = time.perf_counter()
        fwd = autograd_forward(eng_ref, batch, layer)   # its one forward, timed once
        ctx.sync()
        t_ag_fwd = time.perf_counter() - t
        ag_maps = batched_autograd(eng_ref, batch, layer, feats[:n_ag], chunk=a.autograd_chunk, forward=fwd)
        ctx.sync()
        t_ag = (time.perf_counter() - t - t_ag_fwd) / n_ag
        mem_ag = ctx.peak_gb()
        ag_maps = ag_maps.detach().float().cpu()
        del fwd
        free(ctx)
        log(f"  batched autograd: forward {t_ag_fwd:.3f}s, {t_ag:.4f}s per feature ({n_ag} timed, "
            f"chunk {a.autograd_chunk})")
    eng_maps = torch.as_tensor(res_e.token_maps).flatten(2).float()
    err_seed = float((eng_maps[:, :n_seed] - seed_maps).abs().max() / seed_maps.abs().max())
    err_ag = float((eng_maps[:, :n_ag] - ag_maps).abs().max() / ag_maps.abs().max())
    nmaps = d * nimg
    t_ag_all = t_ag_fwd + t_ag * d
    row = {"layer": layer, "features": d, "images": nimg, "height": h, "width": w,
           "tokens": int(eng_maps.shape[-1]), "engine_chunk": chunk,
           "engine_s": t_eng, "engine_forward_s": t_fwd, "engine_maps_per_s": nmaps / t_eng,
           "seed_features_timed": n_seed, "seed_s_per_feature": t_seed, "seed_s_all_features": t_seed * d,
           "seed_maps_per_s": nimg / t_seed,
           "autograd_features_timed": n_ag, "autograd_chunk": a.autograd_chunk,
           "autograd_forward_s": t_ag_fwd, "autograd_s_per_feature": t_ag,
           "autograd_s_all_features": t_ag_all, "autograd_maps_per_s": nmaps / t_ag_all,
           "speedup_vs_seed": t_seed * d / t_eng, "speedup_vs_autograd": t_ag_all / t_eng,
           "max_rel_diff_vs_seed": err_seed, "max_rel_diff_vs_autograd": err_ag,
           "peak_gpu_gb": {"engine": mem_eng, "seed": mem_seed, "autograd": mem_ag}}
    r = row
    what = "tiny DETR" if ctx.smoke else "DETR-R50 (random weights)"
    md = [f"### 3. Engine vs seed vs batched autograd on {dev}", "",
          f"{what}, {nimg} images {h}x{w} ({r['tokens']} tokens), "
          f"encoder layer {layer}, all {d} features, cp rules, epsilon 0, fp32. Engine: forward + relevance "
          f"(chunk {chunk}). Seed way timed on {n_seed} features, batched autograd on {n_ag} (chunk "
          f"{a.autograd_chunk}; its one forward timed once, its backwards per feature); per-feature costs "
          "extrapolated to all features.", "",
          "| engine s (fwd s) | seed s all (per feature) | autograd s all (fwd s, per feature) "
          "| engine maps/s | seed maps/s | autograd maps/s | vs seed | vs autograd | agree (rel) "
          "| peak GPU GB engine/seed/autograd |",
          "|---|---|---|---|---|---|---|---|---|---|",
          f"| {r['engine_s']:.2f} ({r['engine_forward_s']:.2f}) | {r['seed_s_all_features']:.1f} "
          f"({r['seed_s_per_feature']:.3f}) | {r['autograd_s_all_features']:.2f} "
          f"({r['autograd_forward_s']:.2f}, {r['autograd_s_per_feature']:.4f}) "
          f"| {r['engine_maps_per_s']:.0f} | {r['seed_maps_per_s']:.1f} | {r['autograd_maps_per_s']:.1f} "
          f"| **{r['speedup_vs_seed']:.0f}x** | **{r['speedup_vs_autograd']:.1f}x** "
          f"| {max(err_seed, err_ag):.1e} "
          f"| {fmt(mem_eng, '.1f')}/{fmt(mem_seed, '.1f')}/{fmt(mem_ag, '.1f')} |"]
    return {"rows": [row]}, "\n".join(md) + "\n"


# ------------------------------------------------------------------------------------------- 4. sweep

def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    img = base + 40 * np.sin((xx[..., None] * np.array([1, 2, 3]) + yy[..., None]) / 37.0)
    for _ in range(int(rng.integers(2, 6))):
        y0, x0 = int(rng.integers(0, h - h // 8)), int(rng.integers(0, w - w // 8))
        y1, x1 = y0 + int(rng.integers(h // 10, h // 3)), x0 + int(rng.integers(w // 10, w // 3))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_images(folder: Path, n: int, h: int, w: int, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(_scene(rng, h, w)).save(folder / f"car_{i:04d}.jpg", quality=90)
    return folder


def part_sweep(ctx: Ctx) -> tuple[dict, str]:
    import importlib

    try:
        importlib.import_module("ray")
    except Exception as exc:  # no Ray on this machine: the engine parts still ran
        return ({"skipped": f"ray does not import: {type(exc).__name__}: {exc}"},
                f"### 4. Thesis sweep\n\nSkipped: ray does not import ({type(exc).__name__}: {exc}).\n")
    from benchmarks.sweep_cpu import SPLIT_COLUMNS, run_cli, run_summary, split_cells
    from lrp_ray.models import DetrConfig

    a = ctx.args
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="lrp_gpu_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    n_img = 3 if ctx.smoke else a.sweep_images
    h, w = (64, 96) if ctx.smoke else (a.height, a.width)
    t = time.perf_counter()
    images = generate_images(work / "images", n_img, h, w)
    t_gen = time.perf_counter() - t
    overrides = TINY if ctx.smoke else R50_800
    cfg = DetrConfig().with_overrides(overrides)
    cfg.to_yaml(work / "config.yaml")
    torch.manual_seed(0)
    from lrp_ray.models import build_model

    torch.save(build_model(cfg).state_dict(), work / "model_final.pth")
    log(f"  {n_img} images {h}x{w} generated in {t_gen:.1f}s; config and random weights in {work}")
    device = "cuda" if ctx.device.type == "cuda" else "cpu"
    cli = ["--spec", str(REPO / a.sweep_spec), "--config", str(work / "config.yaml"),
           "--weights", str(work / "model_final.pth"), "--images", str(images), "--device", device,
           "--address", "local", "--overwrite", *a.sweep_args.split()]
    if ctx.smoke:
        cli += ["--actors", "1", "--cpus-per-actor", "1"]
    out = work / "sweep_out"
    timeout = ctx.left() - a.sweep_reserve
    log(f"  python -m lrp_ray.sweep {' '.join(cli)} --out {out}   (time limit {timeout:.0f}s)")
    grace = max(0.0, a.sweep_reserve - 15)   # all work done at the limit: let it write summary + manifest
    run = run_cli(cli, out, timeout=timeout, echo=a.echo_sweep, grace=grace)
    if run.rc == 2 and "has no GPU" in run.text and torch.cuda.is_available():
        timeout = ctx.left() - a.sweep_reserve
        log(f"  Ray found no GPU by itself: again with ray.init(num_gpus={torch.cuda.device_count()}) "
            f"(time limit {timeout:.0f}s)")
        run = run_cli(cli, out, timeout=timeout, echo=a.echo_sweep, grace=grace,
                      num_gpus=torch.cuda.device_count())
    s = run_summary(run)
    if run.rc not in (0, 1, 130):
        log("\n".join("  | " + ln for ln in s["log_tail"]))
    total = s["maps_total"]
    complete = s["status"] == "complete"
    projected = None
    if not complete and total:  # start-up until the first item, then the rest at the steady rate
        if s["maps_per_s_steady"] and s["t_first_item_s"] is not None:
            projected = s["t_first_item_s"] + total / s["maps_per_s_steady"]
        elif s["maps_per_s_sweep"] or s["maps_per_s_wall"]:
            projected = total / (s["maps_per_s_sweep"] or s["maps_per_s_wall"])
    s["sweep_status"] = s.pop("status")
    res = {"images": n_img, "height": h, "width": w, "spec": a.sweep_spec, "cli": cli, "work": str(work),
           "image_generation_s": t_gen, "complete": complete, "projected_total_s": projected, **s}
    what = "tiny DETR" if ctx.smoke else "DETR-R50, 800x1333 test size"
    stopped = " (time budget reached: interrupted, resumable)" if run.timed_out else ""
    md = ["### 4. Thesis sweep through the CLI on " + device, "",
          f"`python -m lrp_ray.sweep --spec {a.sweep_spec}` with a generated config + random weights "
          f"({what}), {n_img} generated images {h}x{w}; rc {run.rc}, status {s['sweep_status']}{stopped}.",
          "", "| maps | of | wall s | sweep s | maps/s (sweep) | maps/s (steady) | maps/s (wall) "
          "| projected total s | " + " | ".join(SPLIT_COLUMNS) + " | actor peak GPU GB |",
          "|---|---|---|---|---|---|---|---|" + "---|" * len(SPLIT_COLUMNS) + "---|"]
    sweep_s = (s["split"].get("sweep") or {}).get("s")
    dev_peaks = [v for v in (s["peak_rss"]["actors_device"] or {}).values() if v]
    md.append(f"| {s['maps']} | {fmt(total)} | {s['wall_s']:.1f} | {fmt(sweep_s, '.1f')} "
              f"| {fmt(s['maps_per_s_sweep'], '.0f')} | {fmt(s['maps_per_s_steady'], '.0f')} "
              f"| {fmt(s['maps_per_s_wall'], '.0f')} "
              f"| {fmt(projected, '.0f')} | " + " | ".join(split_cells(s["split"]))
              + f" | {fmt(max(dev_peaks) / 1e9 if dev_peaks else None, '.1f')} |")
    md += ["", "maps/s: sweep = maps / manifest timings.sweep (actor start-up included); steady = from the "
               "first to the last finished work item; wall = the CLI process. Projected total (when stopped "
               "by the budget): time to the first item + all maps at the steady rate. Split in seconds: `~` "
               "derived from the CLI's log lines, n/a not in the manifest (JSON `split` has notes)."]
    if not a.work and complete:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return res, "\n".join(md) + "\n"


# ------------------------------------------------------------------------------------------- main

RUNNERS: dict[str, Callable[[Ctx], tuple[dict, str]]] = {
    "correctness": part_correctness, "propagation": part_propagation, "baselines": part_baselines,
    "sweep": part_sweep,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="every part at tiny size on the CPU (test of this script)")
    ap.add_argument("--out", default=None, help="result folder (default: $OUT, else benchmarks/results/gpu)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma separated subset of {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 540; 300 with --smoke)")
    ap.add_argument("--min-left", type=float, default=60.0,
                    help="skip the remaining parts when fewer seconds are left (default 60)")
    ap.add_argument("--device", default=None,
                    help="cuda / cpu (default: cuda if available; cpu with --smoke)")
    g = ap.add_argument_group("sizes")
    g.add_argument("--height", type=int, default=800)
    g.add_argument("--width", type=int, default=1066)
    g.add_argument("--batch", type=int, default=4, help="images per propagation (parts 2, 3)")
    g.add_argument("--layer", type=int, default=5)
    g.add_argument("--ks", default="32,64,128,256", help="features per propagation (part 2)")
    g.add_argument("--precisions", default="fp32,bf16", help="part 2 precisions")
    g.add_argument("--modules", default="encoder,decoder", help="part 2 modules")
    g.add_argument("--reps", type=int, default=3, help="timed calls per configuration (part 2)")
    g.add_argument("--peak-n", type=int, default=8192, help="matmul size for the peak (part 2)")
    g.add_argument("--no-count-flops", dest="count_flops", action="store_false",
                   help="skip the FlopCounterMode call per configuration (part 2)")
    g.add_argument("--fp32-tol", type=float, default=1e-3, help="part 1 tolerance, fp32")
    g.add_argument("--bf16-tol", type=float, default=1e-1, help="part 1 tolerance, bf16")
    g.add_argument("--engine-chunk", type=int, default=256, help="engine features per propagation (part 3)")
    g.add_argument("--seed-features", type=int, default=8, help="features timed the seed's way (part 3)")
    g.add_argument("--autograd-features", type=int, default=256, help="features timed by batched autograd")
    g.add_argument("--autograd-chunk", type=int, default=32, help="is_grads_batched chunk (part 3)")
    g.add_argument("--sweep-images", type=int, default=131)
    g.add_argument("--sweep-spec", default="jobs/thesis_sweep.yaml")
    g.add_argument("--sweep-args", default="", help="more CLI flags for the sweep, e.g. '--cpus-per-actor 8'")
    g.add_argument("--sweep-reserve", type=float, default=40.0,
                   help="seconds kept back from the sweep's time limit for stopping it and writing "
                        "(default 40)")
    g.add_argument("--work", default=None, help="folder for the sweep's images, model and output "
                                                "(default: a temp folder, deleted when the sweep completed)")
    g.add_argument("--quiet-sweep", dest="echo_sweep", action="store_const", const=False, default="brief",
                   help="do not echo the sweep's log (default: all but its per-work-item lines)")
    g.add_argument("--verbose-sweep", dest="echo_sweep", action="store_const", const=True,
                   help="echo every line of the sweep's log")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget is None:
        args.budget = 300.0 if args.smoke else 540.0
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.out is None:
        args.out = os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu")
    try:
        import pydantic  # noqa: F401
    except ImportError:
        print("run_all: pydantic is missing (lrp_ray's model config needs it): on a machine without a "
              "registry carry its wheels, see benchmarks/gpu/README.md", file=sys.stderr)
        return 2
    ctx = Ctx(args)
    info = machine_info(ctx)
    log(f"run_all: {info.get('gpu', 'no GPU')}, device {ctx.device}, budget {args.budget:.0f}s, "
        f"out {ctx.out}")
    selected = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in selected if p not in RUNNERS]
    if bad:
        print(f"run_all: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    statuses: dict[str, dict] = {}
    mds = []
    for name in selected:
        left = ctx.left()
        t = time.perf_counter()
        if left < args.min_left:
            status = {"status": "skipped",
                      "reason": f"time budget: {left:.0f}s left (< {args.min_left:.0f}s)"}
            payload, md = {}, f"### {name}\n\nSkipped: {status['reason']}.\n"
        else:
            log(f"== {name} ({left:.0f}s left)")
            try:
                payload, md = RUNNERS[name](ctx)
                status = {"status": "skipped" if "skipped" in payload else "ok"}
            except Exception as exc:
                tb = traceback.format_exc()
                log(tb)
                status = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": tb}
                payload, md = {}, f"### {name}\n\nFailed: `{type(exc).__name__}: {exc}`\n"
            free(ctx)
        status["seconds"] = time.perf_counter() - t
        statuses[name] = status
        full = {"part": name, "machine": info, "smoke": ctx.smoke,
                "argv": sys.argv[1:] if argv is None else argv, "elapsed_s": ctx.elapsed(),
                "budget_s": args.budget, **payload, **status}
        try:
            write_part(ctx, name, full, md)
        except Exception as exc:  # keep going: the other parts may still be written
            log(f"could not write {name}: {exc}")
        mds.append(md)
        log(f"== {name}: {status['status']} in {status['seconds']:.1f}s")
    log("\n" + "\n".join(mds))
    log("parts: " + ", ".join(f"{k} {v['status']}" for k, v in statuses.items())
        + f"; {ctx.elapsed():.0f}s of {args.budget:.0f}s")
    return 0 if all(v["status"] in ("ok", "skipped") for v in statuses.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
