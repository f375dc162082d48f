"""Detection concepts on the CPU: the full concept profile of a detection, and K conditional heatmaps.

All in one process; speed is reported as ratios against baselines run in the same process.

(a) Concept profile: one propagation from each detection's class logit (``engine.detection_relevance``
    with every encoder and decoder layer tapped: the relevance of all d channels at every layer and the
    token map). Reference: one autograd backward of the rule-modified model from the logit to every layer
    output and the input tokens (the float32 formulation of ``tests/lrp_oracle.py``).
(b) K conditional heatmaps for one detection (top-1 per image) at one layer: ours, one vectorised pass
    of K targets (``engine.conditional_maps``), against the zennit-crp way: one autograd backward per
    condition from the logit with a gradient-masking hook at the conditioning layer (``hook``), and the
    cheaper restart from the layer (``restart``: one backward to the layer, then one backward per
    condition from the layer with a masked gradient, as ``tests/test_lrp_detections.py``'s oracle).
    Both run on the rule-modified float32 model (cp rules, epsilon 0, the engine's settings), on the same
    tokens, detection and layer; the maps are checked to agree (max relative difference reported).
    At a decoder layer below the top the hook's maps also carry what reached the encoder memory through
    the cross-attention above the layer; they are checked against ours for channel c plus ours for
    ``MEMORY_BYPASS``.

Cases: DETR-R50 shape (random weights) on synthetic 480x640 images, and the bundled demo model on its demo
images. ``--smoke``: a tiny DETR and the demo model at small sizes, in seconds (for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrp_ray.lrp.concepts as concepts_mod  # noqa: E402
import lrp_ray.lrp.propagate as propagate_mod  # noqa: E402
from benchmarks.common import RESULTS, images, machine  # noqa: E402
from lrp_ray.lrp import EngineConfig, LrpEngine  # noqa: E402
from lrp_ray.lrp.concepts import MEMORY_BYPASS, top_channels  # noqa: E402
from lrp_ray.models import DetrConfig, build_model, load_config, load_model, preprocess  # noqa: E402
from tests.lrp_oracle import _ln, oracle_forward  # noqa: E402

NAME = "concepts_cpu"


# ------------------------------------------------------------------------------------- timing helpers
class Split:
    """Seconds spent in the concept module's stages (patched in, this process only)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        names = {"logit_start": "start (class head)", "propagate_from": "propagation",
                 "_token_maps": "token maps"}
        for attr, label in names.items():
            setattr(concepts_mod, attr, self._wrap(getattr(concepts_mod, attr), label))
        # folded FFN maps: built once per cache and layer (inside the propagation), then reused
        propagate_mod.block_token_maps = self._wrap(propagate_mod.block_token_maps, "FFN map building")

    def _wrap(self, fn: Callable, label: str) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.s[label] = self.s.get(label, 0.0) + time.perf_counter() - t
        return timed

    def take(self, total: float) -> dict[str, float]:
        out = dict(self.s)
        out["other (masks, concepts, numpy)"] = max(0.0, total - sum(out.values()))
        self.s = {}
        return out


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any, list[float]]:
    """Median seconds of ``repeats`` runs of ``fn``, its last result, all the times."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out, times


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, split: Split | None = None,
                split_key: str | None = None) -> tuple[dict, dict, dict, dict]:
    """Run every function of ``fns`` once untimed (warm-up), then ``repeats`` rounds of all of them in
    turn (so load changes hit every method alike). Returns the best (minimum) seconds, the last outputs,
    all times, and ``split_key``'s stage split of its best round. The minimum, not the median: on a shared
    machine other processes only ever add time."""
    outs = {}
    warm = 0.0
    for n, fn in fns.items():
        outs[n] = fn()
        if split is not None:
            warm += split.take(0.0).get("FFN map building", 0.0)
    times: dict[str, list[float]] = {n: [] for n in fns}
    splits: list[dict[str, float]] = []
    for _ in range(repeats):
        for n, fn in fns.items():
            t = time.perf_counter()
            outs[n] = fn()
            dt = time.perf_counter() - t
            times[n].append(dt)
            if split is not None:
                part = split.take(dt)
                if n == split_key:
                    splits.append(part)
    best = {n: min(v) for n, v in times.items()}
    part = {}
    if splits:
        part = splits[int(np.argmin(times[split_key]))]
        part["FFN map building (warm-up, once per cache)"] = warm
    return best, outs, times, part


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------------------------------------- baseline
class Autograd:
    """The rule-modified float32 model by plain autograd (tests/lrp_oracle.py), from the class logit of
    one detection per image; conditioning masks the gradient at a layer output."""

    def __init__(self, model: Any, src: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, rules: str,
                 query: np.ndarray, cls: np.ndarray) -> None:
        x0, p, kpm = (src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1))
        self.model, self.rules, self.kpm, self.grid = model, rules, kpm, mask.shape[1:]
        self.x0 = x0.detach().clone().requires_grad_(True)
        self.p = p
        self.q = torch.as_tensor(query)
        self.c = torch.as_tensor(cls)

    def forward(self) -> None:
        tr = self.model.transformer
        self.enc, self.dec = oracle_forward(tr, self.x0, self.p, self.kpm, self.model.query_embed.weight,
                                            self.rules)
        hs = _ln(self.dec[-1], tr.decoder.norm) if tr.decoder.norm is not None else self.dec[-1]
        w, b = self.model.class_embed.weight, self.model.class_embed.bias
        ar = torch.arange(len(self.q))
        self.logit = (hs[ar, self.q] * w[self.c]).sum(-1) + b[self.c]

    def _map(self, gx: torch.Tensor) -> np.ndarray:
        return (self.x0 * gx).sum(-1).view(len(self.q), *self.grid).detach().numpy()

    def _out(self, module: str, layer: int) -> torch.Tensor:
        return self.enc[layer] if module == "encoder" else self.dec[layer]

    def profile(self) -> tuple[dict, np.ndarray]:
        """Concepts at every layer (as detection_relevance) and the token map: one backward."""
        outs = [*self.enc, *self.dec]
        grads = torch.autograd.grad(self.logit.sum(), [*outs, self.x0], retain_graph=True)
        ne = len(self.enc)
        conc = {}
        ar = torch.arange(len(self.q))
        with torch.no_grad():
            for i, (t, g) in enumerate(zip(outs, grads[:-1], strict=True)):
                r = t * g
                if i < ne:
                    conc[("encoder", i)] = (r * (~self.kpm)[..., None]).sum(1).numpy()
                else:
                    conc[("decoder", i - ne)] = r[ar, self.q].numpy()
        return conc, self._map(grads[-1])

    def _mask(self, g: torch.Tensor, module: str, chans: np.ndarray) -> torch.Tensor:
        m = torch.zeros_like(g)
        for bi, c in enumerate(chans):
            if module == "encoder":
                m[bi, :, int(c)] = 1.0
            else:
                m[bi, int(self.q[bi]), int(c)] = 1.0
        return m

    def hook_maps(self, module: str, layer: int, chans: np.ndarray) -> np.ndarray:
        """zennit-crp's way: per condition a backward from the logit, the layer's gradient masked by a
        hook. ``chans`` [B, K] -> maps [B, K, gh, gw]."""
        t = self._out(module, layer)
        maps = []
        for k in range(chans.shape[1]):
            handle = t.register_hook(lambda g, k=k: g * self._mask(g, module, chans[:, k]))
            try:
                (gx,) = torch.autograd.grad(self.logit.sum(), self.x0, retain_graph=True)
            finally:
                handle.remove()
            maps.append(self._map(gx))
        return np.stack(maps, 1)

    def restart_maps(self, module: str, layer: int, chans: np.ndarray) -> np.ndarray:
        """One backward to the layer, then per condition one backward from the layer, masked."""
        t = self._out(module, layer)
        (g,) = torch.autograd.grad(self.logit.sum(), t, retain_graph=True)
        maps = []
        for k in range(chans.shape[1]):
            (gx,) = torch.autograd.grad(t, self.x0, grad_outputs=g * self._mask(g, module, chans[:, k]),
                                        retain_graph=True)
            maps.append(self._map(gx))
        return np.stack(maps, 1)

    def batched_maps(self, module: str, layer: int, chans: np.ndarray) -> np.ndarray:
        """One backward to the layer, then all K conditions in one ``is_grads_batched`` backward."""
        t = self._out(module, layer)
        (g,) = torch.autograd.grad(self.logit.sum(), t, retain_graph=True)
        gm = torch.stack([g * self._mask(g, module, chans[:, k]) for k in range(chans.shape[1])])
        (gx,) = torch.autograd.grad(t, self.x0, grad_outputs=gm, is_grads_batched=True, retain_graph=True)
        return np.stack([self._map(gx[k]) for k in range(chans.shape[1])], 1)


# ------------------------------------------------------------------------------------------ one case
def run_case(name: str, model: Any, imgs: list[np.ndarray], k: int, rules: str, repeats: int,
             profile_m: list[int], split: Split, log: Callable[[str], None], cfg: Any = None,
             k_large: int = 0) -> dict:
    eng = LrpEngine(model, EngineConfig(rules=rules, epsilon=0.0, precision="fp32", device="cpu"))
    cfg = cfg if cfg is not None else model.cfg
    batch = preprocess(imgs, cfg)
    n_enc, n_dec, d = len(eng.weights.encoder), len(eng.weights.decoder), eng.weights.hidden_dim
    all_layers = {"encoder": list(range(n_enc)), "decoder": list(range(n_dec))}
    b0 = lambda: eng.encoder_inputs(batch)  # noqa: E731
    src, pos, mask = b0()
    t_backbone = interleaved({"backbone": b0}, repeats)[0]["backbone"]

    def fwd():
        c = eng.forward_tokens(src, pos, mask)
        c.meta["image_sizes"] = [list(map(int, s)) for s in batch.image_sizes]
        return c

    cache = fwd()
    dets = eng.select_detections(cache, "top1")
    ag = Autograd(model, src, pos, mask, rules, dets.query[:, 0], dets.class_id[:, 0])
    med, _, _, _ = interleaved({"ours": fwd, "autograd": ag.forward}, repeats)
    t_fwd, t_ag_fwd = med["ours"], med["autograd"]
    gh, gw = cache.meta["grid"]
    info = {"case": name, "images": len(imgs), "input_hw": [list(map(int, s)) for s in batch.input_sizes],
            "grid": [int(gh), int(gw)], "tokens": int(gh * gw), "hidden_dim": d, "enc_layers": n_enc,
            "dec_layers": n_dec, "queries": int(cache.meta["num_queries"]), "rules": rules, "k": k,
            "repeats": repeats, "backbone_s": t_backbone, "forward_s": t_fwd, "autograd_forward_s": t_ag_fwd}
    log(f"[{name}] grid {gh}x{gw}, d {d}, {n_enc}+{n_dec} layers; backbone {t_backbone:.3f} s, "
        f"transformer forward {t_fwd:.3f} s, autograd forward (graph) {t_ag_fwd:.3f} s")

    # (a) the full concept profile (top-1 timed against the autograd profile backward, interleaved)
    profiles = []
    rel1 = None
    for m in profile_m:
        dets = eng.select_detections(cache, f"top{m}")
        n_det = int(dets.valid.sum())
        fns = {"ours": lambda dets=dets: eng.detection_relevance(cache, dets, all_layers)}
        if m == 1:
            fns["autograd"] = ag.profile
        med, outs, times, parts = interleaved(fns, repeats, split, "ours")
        t_prof = med["ours"]
        profiles.append({"top": m, "detections": n_det, "profile_s": t_prof,
                         "per_detection_s": t_prof / n_det, "split_s": parts, "times_s": times["ours"]})
        log(f"[{name}] profile top{m}: {n_det} detections, {t_prof:.3f} s ({t_prof / n_det:.3f} s per "
            f"detection) {({a: round(b, 3) for a, b in parts.items()})}")
        if m == 1:
            rel1 = outs["ours"]
            t_ag_prof = med["autograd"]
            ag_conc, ag_map = outs["autograd"]
    assert rel1 is not None
    prof_err = max([rel_err(rel1.token_maps[:, 0], ag_map)]
                   + [rel_err(rel1.concepts[key][:, 0], v) for key, v in ag_conc.items()])
    info["autograd_profile_s"] = t_ag_prof
    info["profile_max_rel_diff"] = prof_err
    log(f"[{name}] autograd profile backward {t_ag_prof:.3f} s, max rel diff {prof_err:.2e}")

    # (b) K conditional maps at one layer: ours and the three autograd ways, interleaved
    cond_layers = list(dict.fromkeys([("encoder", n_enc - 1, k), ("decoder", n_dec // 2, k),
                                      ("decoder", n_dec - 1, k)]))
    if k_large:
        cond_layers.append(("encoder", n_enc - 1, min(k_large, d)))
    rows = []
    for module, layer, kk in cond_layers:
        chans = top_channels(rel1, module, layer, kk)                             # [B, 1, K]
        c0 = chans[:, 0]
        fns = {"ours": lambda module=module, layer=layer, chans=chans:
               eng.conditional_maps(cache, rel1, module, layer, chans),
               "hook": lambda module=module, layer=layer, c0=c0: ag.hook_maps(module, layer, c0),
               "restart": lambda module=module, layer=layer, c0=c0: ag.restart_maps(module, layer, c0),
               "batched": lambda module=module, layer=layer, c0=c0: ag.batched_maps(module, layer, c0)}
        if kk > 16:  # vmap over many conditions: memory; the K=8 rows show its speed
            del fns["batched"]
        try:
            if "batched" in fns:
                fns["batched"]()
        except Exception as e:  # noqa: BLE001 - vmap may not cover every op
            del fns["batched"]
            log(f"[{name}] batched autograd failed: {type(e).__name__}: {e}")
        med, outs, times, parts = interleaved(fns, repeats, split, "ours")
        t_ours, t_hook, t_rst, t_bat = med["ours"], med["hook"], med["restart"], med.get("batched")
        ours = outs["ours"].token_maps[:, 0]                                       # [B, K, gh, gw]
        err_rst = rel_err(ours, outs["restart"])
        err_bat = rel_err(ours, outs["batched"]) if "batched" in outs else None
        bypass = module == "decoder" and layer < n_dec - 1
        if bypass:  # the hook also keeps the memory's relevance from above the layer (not timed)
            bypass_ch = np.full((len(imgs), 1, 1), MEMORY_BYPASS)
            extra = eng.conditional_maps(cache, rel1, module, layer, bypass_ch)
            split.take(0.0)
            err_hook = rel_err(ours + extra.token_maps[:, 0], outs["hook"])
        else:
            err_hook = rel_err(ours, outs["hook"])
        abs_diff = float(np.abs(ours - outs["restart"]).max())
        row = {"module": module, "layer": layer, "k": kk, "ours_s": t_ours, "ours_split_s": parts,
               "hook_s": t_hook, "restart_s": t_rst, "ratio_vs_hook": t_hook / t_ours,
               "ratio_vs_restart": t_rst / t_ours, "max_rel_diff_restart": err_rst,
               "batched_s": t_bat, "ratio_vs_batched": t_bat / t_ours if t_bat else None,
               "max_rel_diff_batched": err_bat,
               "max_rel_diff_hook": err_hook, "max_abs_diff_restart": abs_diff,
               "hook_includes_bypass": bypass, "times_s": times,
               "ffn_maps": concepts_mod._use_maps(eng, kk)}
        # end to end from the tokens: forward + profile (to pick the channels) + K maps
        row["e2e_ours_s"] = t_fwd + profiles[0]["profile_s"] + t_ours
        row["e2e_hook_s"] = t_ag_fwd + t_ag_prof + t_hook
        row["e2e_ratio"] = row["e2e_hook_s"] / row["e2e_ours_s"]
        rows.append(row)
        log(f"[{name}] {module} {layer} K={kk}: ours {t_ours:.3f} s, hook {t_hook:.3f} s "
            f"({row['ratio_vs_hook']:.2f}x), restart {t_rst:.3f} s ({row['ratio_vs_restart']:.2f}x), "
            f"batched {_f(t_bat, '.3f')} s; "
            f"rel diff restart {err_rst:.1e} hook {err_hook:.1e}; split "
            f"{ {a: round(b, 3) for a, b in parts.items()} }")
    ag.enc = ag.dec = ag.logit = None  # free the graph

    # the notebook API end to end (preprocess + forward + profile + K maps at every layer)
    from lrp_ray.api import explain_detections

    t_api, expl, _ = timed(lambda: explain_detections(model, imgs, detections="top1", module="both",
                                                      top_concepts=k, batch_size=len(imgs), engine=eng), 1)
    split.take(0.0)
    info["explain_detections_s"] = t_api
    info["explain_detections_what"] = (f"top1 per image, both modules, all {n_enc + n_dec} layers, "
                                       f"top_concepts={k}")
    log(f"[{name}] explain_detections end to end: {t_api:.3f} s")
    return {**info, "profiles": profiles, "conditional": rows}


# --------------------------------------------------------------------------------------------- output
def _load(v: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in v)


def _built(r: dict) -> str:
    if not r["ffn_maps"]:
        return "not used"
    return f"{r['ours_split_s'].get('FFN map building (warm-up, once per cache)', 0.0):.2f}"


def _f(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(payload: dict) -> str:
    info, cmd = payload["machine"], payload["command"]
    lines = ["### Detection concepts (cpu, fp32)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
             f"torch {info['torch']}, {info['date']}  ", f"Command: `{cmd}`  ",
             "cp rules, epsilon 0, fp32; one process; one warm-up, then the best of the repeats with the "
             "methods interleaved; detections: top-1 per image. "
             f"Load average (1/5/15 min) at start {_load(payload['load_avg_start'])}, at end "
             f"{_load(payload['load_avg_end'])}; wall {payload['wall_s']:.0f} s.",
             ""]
    lines += ["| case | images | tokens/img | d | layers | backbone s | forward s | profile s (per det.) "
              "| autograd profile s | explain_detections s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in payload["cases"]:
        p = c["profiles"][0]
        lines.append(f"| {c['case']} | {c['images']} | {c['tokens']} | {c['hidden_dim']} "
                     f"| {c['enc_layers']}+{c['dec_layers']} | {c['backbone_s']:.3f} | {c['forward_s']:.3f} "
                     f"| {p['profile_s']:.3f} ({p['per_detection_s']:.3f}) "
                     f"| {c['autograd_forward_s']:.3f} + {c['autograd_profile_s']:.3f} "
                     f"| {c['explain_detections_s']:.2f} |")
    lines += ["", "Profile = one `detection_relevance` call with every layer tapped (all d channels at every "
              "encoder and decoder layer + the token map); autograd profile = forward with graph + one "
              "backward to every layer output.", ""]
    lines += ["| case | top-M | detections | profile s | per detection s | propagation s | token maps s "
              "| start s | other s |", "|---|---|---|---|---|---|---|---|---|"]
    for c in payload["cases"]:
        for p in c["profiles"]:
            s = p["split_s"]
            lines.append(f"| {c['case']} | {p['top']} | {p['detections']} | {p['profile_s']:.3f} "
                         f"| {p['per_detection_s']:.3f} | {s.get('propagation', 0):.3f} "
                         f"| {s.get('token maps', 0):.4f} | {s.get('start (class head)', 0):.4f} "
                         f"| {s.get('other (masks, concepts, numpy)', 0):.4f} |")
    lines += ["", "K conditional maps for the top-1 detection of each image at one layer:", "",
              "| case | layer | K | ours s | propagation s | FFN maps built (once per cache) s "
              "| hook s (K backwards) | **vs hook** "
              "| restart s | vs restart | batched s | vs batched | max rel diff (restart / hook / batched) "
              "| e2e ours s | e2e hook s | e2e ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in payload["cases"]:
        for r in c["conditional"]:
            s = r["ours_split_s"]
            lines.append(
                f"| {c['case']} | {r['module']} {r['layer']} | {r['k']} | {r['ours_s']:.3f} "
                f"| {s.get('propagation', 0):.3f} | {_built(r)} "
                f"| {r['hook_s']:.3f} | **{r['ratio_vs_hook']:.2f}x** "
                f"| {r['restart_s']:.3f} | {r['ratio_vs_restart']:.2f}x | {_f(r['batched_s'], '.3f')} "
                f"| {_f(r['ratio_vs_batched'], '.2f')}{'x' if r['ratio_vs_batched'] else ''} "
                f"| {r['max_rel_diff_restart']:.1e} / {r['max_rel_diff_hook']:.1e}"
                f"{'*' if r['hook_includes_bypass'] else ''} / {_f(r['max_rel_diff_batched'], '.1e')} "
                f"| {r['e2e_ours_s']:.3f} | {r['e2e_hook_s']:.3f} "
                f"| {r['e2e_ratio']:.2f}x |")
    lines += ["", "\\* hook maps compared with ours + the MEMORY_BYPASS map (the hook keeps what reached the "
              "memory through the cross-attention above the layer). e2e = transformer forward + profile + K "
              "maps (ours) vs forward with graph + profile backward + K hooked backwards (backbone excluded, "
              "the same for both). Folded FFN maps (used from d/4 targets on) are built once per forward "
              "cache "
              "in the warm-up and reused by every later call on that cache; they are not in 'ours s'."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for the tests)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--k", type=int, default=8, help="conditions per detection")
    ap.add_argument("--k-large", type=int, default=64,
                    help="one more row at the last encoder layer with this many conditions (0: none)")
    ap.add_argument("--rules", default="cp", choices=("cp", "attnlrp"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-m", default="1,5", help="top-M detections per image for the profile rows")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                                                            "--smoke writes nothing unless given)")
    args = ap.parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    load_start, t_start = os.getloadavg(), time.perf_counter()
    split = Split()
    profile_m = [int(x) for x in args.profile_m.split(",")]
    if profile_m[0] != 1:
        profile_m = [1, *profile_m]
    repeats = 1 if args.smoke else args.repeats
    cases = []
    if args.smoke:
        from benchmarks.sweep_cpu import TINY

        torch.manual_seed(0)
        r50 = build_model(DetrConfig().with_overrides(TINY))
        r50_imgs, r50_name = images(args.images, 64, 96), "tiny DETR 64x96"
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # config only: random weights (torch.manual_seed(0))
            path = Path(tmp) / "r50.yaml"
            load_config(None, ["INPUT.MIN_SIZE_TEST", str(min(args.height, args.width)),
                               "INPUT.MAX_SIZE_TEST", str(max(args.height, args.width))]).to_yaml(path)
            r50 = load_model(path, None)
        r50_imgs, r50_name = images(args.images, args.height, args.width), \
            f"DETR-R50 shape {args.height}x{args.width}"
    cases.append(run_case(r50_name, r50, r50_imgs, args.k, args.rules, repeats, profile_m, split, log,
                          k_large=args.k_large))
    del r50
    demo = load_model()
    demo_dir = Path(__file__).resolve().parents[1] / "lrp_ray" / "assets" / "demo" / "images"
    from PIL import Image

    files = sorted(p for p in demo_dir.iterdir() if p.suffix in (".png", ".jpg"))[: args.images]
    demo_imgs = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    demo_cfg = demo.cfg.with_overrides({"INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 128}) \
        if args.smoke else None
    cases.append(run_case("demo model" + (" 96 px" if args.smoke else ""), demo, demo_imgs, args.k,
                          args.rules, repeats, profile_m, split, log, demo_cfg))
    cmd = "python benchmarks/concepts_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"machine": machine(), "command": cmd.strip(), "status": "ok", "smoke": args.smoke,
               "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
               "wall_s": time.perf_counter() - t_start, "cases": cases}
    md = table(payload)
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{NAME}.json").write_text(json.dumps(payload, indent=2))
        (out / f"{NAME}.md").write_text(md)
    if not args.quiet:
        print(md)
    return payload


if __name__ == "__main__":
    main()
