# ruff: noqa: E501  (a Markdown template: long text lines)
"""Write ``TRAINING.md`` (how the bundled demo model was trained, and its measured quality) from the
training run's ``train_metrics.json`` and, optionally, the faithfulness summary.

    python -m lrp_ray.demo.training_md lrp_ray/assets/demo [--faithfulness faith.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .scenes import CLASS_NAMES, HELDOUT_START
from .train import DEMO_CONFIG, VAL_START


def render(meta: dict, faith: dict | None = None) -> str:
    t = meta["test"]
    a = meta["args"]
    lines = [
        "# The bundled demo DETR",
        "",
        "`config.yaml` + `model_final.pth` in this folder: our `DETR` class (the same code path as DETR-R50),",
        "a detectron2-style YAML config and a detectron2-layout checkpoint (`{\"model\": {\"detr.*\": ...}}`,",
        f"fp32, {meta['checkpoint_bytes'] / 1e6:.2f} MB), trained from scratch on generated scenes by",
        "`lrp_ray/demo/train.py`. Classes: " + ", ".join(f"{i} `{n}`" for i, n in enumerate(CLASS_NAMES)) + ".",
        "",
        "## Measured quality",
        "",
        f"VOC AP50 (all-point interpolated) on {meta['test_scenes'][1] - meta['test_scenes'][0]} held-out "
        f"generated scenes (indices {meta['test_scenes'][0]}..{meta['test_scenes'][1] - 1}, never used in "
        "training or model selection), measured through the user-facing path `preprocess -> DETR.forward -> "
        "detections` (`python -m lrp_ray.demo.evaluate --n "
        f"{meta['test_scenes'][1] - meta['test_scenes'][0]}`):",
        "",
        "| class | AP50 |",
        "|---|---|",
    ]
    for n in CLASS_NAMES:
        lines.append(f"| {n} | {t[f'AP50_{n}']:.3f} |")
    lines += [
        f"| mean | {t['mAP50']:.3f} |",
        "",
        "The car class is what the demo is for (the faithfulness tests explain car queries); the distractor",
        "classes are rarer and only need to be told apart from cars.",
        "",
    ]
    if faith:
        lines += [
            "## Faithfulness (LRP, rules `cp`)",
            "",
            f"On {faith['images']} held-out scenes with a car (`python -m lrp_ray.demo.faithfulness`; tests",
            "`tests/test_demo_faithfulness.py`): target = decoder layer "
            f"{faith['layer']}, the query with the highest car probability, its largest-activation feature.",
            "",
            f"- query box on a car (IoU >= 0.5): {faith['query_box_iou_ge_0.5']:.1%}",
            f"- pointing game, centre of the most relevant token inside the car box: {faith['pointing_centre']:.1%}"
            f" (token cell overlapping the box: {faith['pointing_cell']:.1%})",
            f"- deletion curve (mean target / initial target over 0..100% of the tokens deleted): "
            f"most relevant first {faith['deletion_auc_relevance']:.3f}, random order "
            f"{faith['deletion_auc_random']:.3f}; relevance-first below random on "
            f"{faith['deletion_rel_below_random']:.0%} of the images",
            "",
        ]
    lines += [
        "## How it was trained",
        "",
        "```bash",
        f"nice -n 15 {meta['command']}",
        "```",
        "",
        f"- Measured: {meta['train_wall_seconds'] / 60:.1f} min wall clock, "
        f"{meta.get('train_cpu_seconds', float('nan')) / 60:.1f} min CPU time with {meta.get('threads', 2)} "
        f"threads, on a {meta.get('cpu_count')}-core {meta.get('machine')} CPU shared with other jobs "
        f"(torch {meta['torch']}); {a['steps']} steps of {a['batch']} scenes ({meta['scenes_seen']} scenes).",
        f"- Best validation AP50 (car) {meta['best_val_AP50_car']:.3f} at step {meta['best_step']} "
        f"(validation: {a['val']} scenes from index {VAL_START}, evaluated every {a['eval_every']} steps; "
        "the best checkpoint is kept).",
        "- Architecture (`config.yaml`): " + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in DEMO_CONFIG.items()
                                                        if k != "MODEL.META_ARCHITECTURE") + ".",
        "- Data: an endless stream of generated scenes (`lrp_ray/demo/scenes.py`, scene i is a pure function",
        "  of i): 96-192 px per side, noisy textured backgrounds, 1-3 non-overlapping objects; each",
        "  scene is seen once. The first 15% of the steps ramp background clutter up from 30%.",
        "- Objective (`lrp_ray/demo/criterion.py`): Hungarian matching (scipy `linear_sum_assignment`,",
        "  costs class 1, L1 5, GIoU 2), cross-entropy with no-object weight 0.1, L1 x5 and GIoU x2 on matched",
        "  boxes, the same on every decoder layer (auxiliary losses).",
        f"- Optimiser: AdamW, lr {a['lr']:g} (backbone {a['backbone_lr']:g}), weight decay 1e-4, gradient-norm",
        "  clipping 0.1, 300 warm-up steps, lr x0.1 for the last 20% of the steps; dropout 0.",
        "- The ResNet-18 (16 stem channels) is trained from scratch with ordinary BatchNorm; the",
        "  statistics are re-estimated on training scenes (precise BN) and folded into detectron2's",
        "  FrozenBatchNorm2d buffers for the checkpoint, which is how a detectron2 backbone is frozen.",
        f"- Deterministic: seed {a['seed']}, `torch.use_deterministic_algorithms(True)`, seeded scene generator.",
        "",
        f"Held-out ranges: training uses scenes from 0 upwards, validation {VAL_START}+, test {HELDOUT_START}+,",
        "sample images (`images/`, `python -m lrp_ray.demo.samples`) 900000+.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrp_ray.demo.training_md")
    ap.add_argument("folder")
    ap.add_argument("--faithfulness", default=None)
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    meta = json.loads((folder / "train_metrics.json").read_text())
    faith = json.loads(Path(args.faithfulness).read_text()) if args.faithfulness else None
    (folder / "TRAINING.md").write_text(render(meta, faith))
    print(f"wrote {folder / 'TRAINING.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
