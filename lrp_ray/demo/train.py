"""Train the demo DETR on generated scenes (deterministic, CPU, minutes).

    python -m lrp_ray.demo.train --out lrp_ray/assets/demo [--steps 5000] [--batch 8] [--threads 2]

The model is the package's own ``DETR`` built by ``lrp_ray.models.build_model`` from the detectron2-style
YAML ``demo_config()`` writes to ``OUT/config.yaml``; the checkpoint is written in detectron2's layout,
``{"model": {"detr.<name>": tensor}}`` to ``OUT/model_final.pth``.  Inputs go through the package's
``preprocess`` (the same resize/normalise/pad as inference), and model selection / the reported AP50 use
``lrp_ray.demo.evaluate`` (the user-facing ``preprocess -> forward -> detections`` path).

Recipe (DETR's, scaled down):
- Hungarian matching and set losses (``criterion.py``): CE with no-object weight 0.1, L1 x5, GIoU x2, the
  same losses on every decoder layer (deep supervision).
- AdamW, weight decay 1e-4, gradient-norm clipping 0.1, linear warm-up then step decay (x0.1 at 80%).
- The ResNet is trained from scratch with ordinary BatchNorm (batch statistics) in place of detectron2's
  FrozenBatchNorm2d; at export the learned affine and running statistics are written into the
  FrozenBatchNorm2d buffers, which is exactly how a detectron2 backbone is frozen (precise-BN
  re-estimation of the running statistics on training scenes right before export).
- Every scene is new (an infinite stream of generated scenes, indices 0, 1, 2, ...); the first 15% of the
  steps ramp the background clutter up from 30% (curriculum).  Validation for keeping the best checkpoint
  uses scenes ``VAL_START..`` and the reported test AP50 uses the disjoint held-out range from
  ``scenes.HELDOUT_START``.
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP threads that spin at barriers while their partner is descheduled make a step
# 10x slower; passive waiting costs nothing when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .criterion import LossWeights, SetCriterion, Target, box_xyxy_to_cxcywh  # noqa: E402
from .scenes import CLASS_NAMES, HELDOUT_START, Scene, generate_scene  # noqa: E402

VAL_START = 50_000


# ----------------------------------------------------------------------------------------- data stream
def scene_batches(batch: int, start: int = 0, difficulty: Callable[[int], float] | None = None
                  ) -> Iterator[tuple[int, list[Scene]]]:
    """Batches of consecutive scenes, grouped by orientation (landscape/portrait) to limit padding.

    Deterministic: the k-th yielded batch is always the same scenes. Yields ``(next_index, scenes)``.
    """
    buckets: dict[bool, list[Scene]] = {True: [], False: []}
    i = start
    step = 0
    while True:
        d = 1.0 if difficulty is None else difficulty(step)
        sc = generate_scene(i, difficulty=d)
        i += 1
        key = sc.image.shape[1] >= sc.image.shape[0]
        buckets[key].append(sc)
        if len(buckets[key]) == batch:
            out, buckets[key] = buckets[key], []
            step += 1
            yield i, out


def targets_for(scenes: Sequence[Scene]) -> list[Target]:
    out = []
    for s in scenes:
        h, w = s.size
        b = torch.as_tensor(s.boxes, dtype=torch.float32) / torch.tensor([w, h, w, h], dtype=torch.float32)
        out.append(Target(labels=torch.as_tensor(s.labels, dtype=torch.long), boxes=box_xyxy_to_cxcywh(b)))
    return out


# ------------------------------------------------------------------------------ BatchNorm <-> Frozen BN
def _is_frozen_bn(m: nn.Module) -> bool:
    return type(m).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(m, k) for k in ("weight", "bias", "running_mean", "running_var"))


def thaw_batchnorm(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Replace every FrozenBatchNorm2d by a fresh trainable BatchNorm2d; returns [(path, frozen module)]."""
    swapped = []
    for path, child in list(model.named_modules()):
        if path and _is_frozen_bn(child):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            bn = nn.BatchNorm2d(child.weight.numel(), eps=float(getattr(child, "eps", 1e-5)))
            setattr(parent, name, bn)
            swapped.append((path, child))
    return swapped


@torch.no_grad()
def freeze_batchnorm(model: nn.Module, swapped: list[tuple[str, nn.Module]]) -> nn.Module:
    """A copy of ``model`` with each trained BatchNorm2d folded back into a FrozenBatchNorm2d."""
    out = copy.deepcopy(model)
    for path, template in swapped:
        bn = out.get_submodule(path)
        frozen = copy.deepcopy(template)
        frozen.weight.copy_(bn.weight)
        frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        parent_path, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent_path) if parent_path else out, name, frozen)
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


@torch.no_grad()
def precise_bn(model: nn.Module, forward: Callable, scenes_iter: Iterator, n_batches: int) -> None:
    """Re-estimate BatchNorm running statistics (cumulative average) on training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was = model.training
    model.train()
    for _ in range(n_batches):
        _, scenes = next(scenes_iter)
        forward(model, scenes)
    model.train(was)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


# ------------------------------------------------------------------------------------------- training
def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 if step >= int(0.8 * total) else 1.0


def difficulty_schedule(total: int) -> Callable[[int], float]:
    ramp = max(1, int(0.15 * total))
    return lambda step: min(1.0, 0.3 + 0.7 * step / ramp)


def train(model: nn.Module,
          forward_layers: Callable[[nn.Module, list[Scene]], tuple[list[Tensor], list[Tensor]]],
          evaluate: Callable[[nn.Module], dict[str, float]], *, steps: int, batch: int, lr: float,
          backbone_lr: float, weight_decay: float = 1e-4, clip: float = 0.1, warmup: int = 300,
          eval_every: int = 500, precise_bn_batches: int = 50, log: Callable[[str], None] = print,
          on_best: Callable[[nn.Module, int, dict], None] | None = None,
          backbone_prefix: str = "backbone.") -> tuple[nn.Module, dict]:
    """Generic DETR training loop.

    ``forward_layers(model, scenes)`` -> per decoder layer (pred_logits [B,Q,C+1], pred_boxes [B,Q,4]);
    ``evaluate(frozen_model)`` -> metrics dict with ``AP50_car``.  Returns (best frozen model, history).
    """
    swapped = thaw_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(True)
    bb = [p for n, p in model.named_parameters() if n.startswith(backbone_prefix)]
    rest = [p for n, p in model.named_parameters() if not n.startswith(backbone_prefix)]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": bb, "lr": backbone_lr}],
                            lr=lr, weight_decay=weight_decay)
    base = [lr, backbone_lr]
    crit = SetCriterion(len(CLASS_NAMES), LossWeights())
    stream = scene_batches(batch, 0, difficulty_schedule(steps))
    history: dict = {"evals": [], "losses": []}
    best, best_ap, best_step = None, -1.0, -1
    t0 = time.time()
    run = {"loss": 0.0, "ce": 0.0, "l1": 0.0, "giou": 0.0, "n": 0}
    model.train()
    next_index = 0
    for step in range(steps):
        f = lr_factor(step, steps, warmup)
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * f
        next_index, scenes = next(stream)
        logits, boxes = forward_layers(model, scenes)
        loss, parts = crit(logits, boxes, targets_for(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        run["loss"] += float(loss.detach())
        for k in ("ce", "l1", "giou"):
            run[k] += parts[k]
        run["n"] += 1
        if (step + 1) % 100 == 0:
            n = run.pop("n")
            msg = {k: round(v / n, 4) for k, v in run.items()}
            history["losses"].append({"step": step + 1, **msg})
            log(f"step {step + 1}/{steps} {msg} lr={opt.param_groups[0]['lr']:.2e} "
                f"scenes={next_index} {time.time() - t0:.0f}s")
            run = {"loss": 0.0, "ce": 0.0, "l1": 0.0, "giou": 0.0, "n": 0}
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            if step + 1 == steps:
                precise_bn(model, lambda m, s: forward_layers(m, s), stream, precise_bn_batches)
            frozen = freeze_batchnorm(model, swapped)
            metrics = evaluate(frozen)
            history["evals"].append({"step": step + 1, "seconds": round(time.time() - t0, 1), **metrics})
            log(f"eval step {step + 1}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
            if metrics["AP50_car"] >= best_ap:
                best, best_ap, best_step = frozen, metrics["AP50_car"], step + 1
                if on_best is not None:
                    on_best(frozen, step + 1, metrics)
            model.train()
    history.update(best_step=best_step, best_val_AP50_car=best_ap, train_seconds=round(time.time() - t0, 1),
                   scenes_seen=next_index)
    return best, history


# ------------------------------------------------------------------------------ the package's DETR path
DEMO_CONFIG = {
    "MODEL.META_ARCHITECTURE": "Detr",
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 12,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 12,
    "MODEL.DETR.HIDDEN_DIM": 64,
    "MODEL.DETR.NHEADS": 4,
    "MODEL.DETR.ENC_LAYERS": 3,
    "MODEL.DETR.DEC_LAYERS": 3,
    "MODEL.DETR.DIM_FEEDFORWARD": 256,
    "MODEL.DETR.DROPOUT": 0.0,
    "MODEL.DETR.NUM_OBJECT_QUERIES": 10,
    "MODEL.DETR.NUM_CLASSES": 4,
    "INPUT.MIN_SIZE_TEST": 224,
    "INPUT.MAX_SIZE_TEST": 384,
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrp_ray.demo.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="lrp_ray/assets/demo",
                    help="output folder (config.yaml, model_final.pth)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--backbone-lr", type=float, default=1.5e-4)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--val", type=int, default=200, help="validation scenes (model selection)")
    ap.add_argument("--test", type=int, default=500, help="held-out test scenes (reported AP50)")
    ap.add_argument("--precise-bn", type=int, default=50,
                    help="training batches to re-estimate BatchNorm statistics before the last evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from . import modelio

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = modelio.write_config(out / "config.yaml", DEMO_CONFIG)
    model = modelio.build(cfg)
    val = [generate_scene(i) for i in range(VAL_START, VAL_START + args.val)]
    from .evaluate import evaluate_model

    log_path = out / "train_log.txt"
    log_f = open(log_path, "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    t0, c0 = time.time(), time.process_time()
    best, hist = train(model, lambda m, s: modelio.forward_layers(m, cfg, s),
                       lambda m: evaluate_model(m, cfg, scenes=val), steps=args.steps, batch=args.batch,
                       lr=args.lr, backbone_lr=args.backbone_lr, eval_every=args.eval_every,
                       precise_bn_batches=args.precise_bn, log=log,
                       on_best=lambda m, step, _: modelio.save_detectron2(m, out / "model_best_so_far.pth"))
    wall, cpu = time.time() - t0, time.process_time() - c0
    size = modelio.save_detectron2(best, out / "model_final.pth")
    (out / "model_best_so_far.pth").unlink(missing_ok=True)
    test = evaluate_model(best, cfg, n=args.test, start=HELDOUT_START)
    log(f"test ({args.test} held-out scenes from {HELDOUT_START}): {json.dumps(test)}")
    cmd = "python -m lrp_ray.demo.train " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd,
            "args": vars(args), "train_wall_seconds": round(wall, 1),
            "train_cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(), "checkpoint_bytes": size,
            "test": test, "test_scenes": [HELDOUT_START, HELDOUT_START + args.test],
            "torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            **{k: v for k, v in hist.items() if k != "losses"}}
    (out / "train_metrics.json").write_text(json.dumps(meta, indent=2))
    log_f.close()
    print(f"wrote {out / 'model_final.pth'} ({size / 1e6:.2f} MB); test AP50 car = {test['AP50_car']:.3f}; "
          f"{wall / 60:.1f} min")
    return 0 if math.isfinite(test["AP50_car"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
