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


def render(meta: dict, faith: dict | None = None, faith_alt: dict | None = None) -> str:
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
        "The car class is what the demo is for (the faithfulness tests explain car queries); the distractors",
        "are rarer and are there to be told apart from cars (`bar`: car-sized and car-shaped, no wheels,",
        "no window).",
        "",
    ]
    if faith:
        lines += [
            "## Faithfulness (LRP, rules `cp`)",
            "",
            f"On the first {faith['images']} held-out scenes with a car (from index {HELDOUT_START}; "
            f"`python -m lrp_ray.demo.faithfulness --n {faith['images']}`; the tests in",
            "`tests/test_demo_faithfulness.py` use the first 50 and 25). Target: decoder layer "
            f"{faith['layer']} (the last), the query with the highest car probability, and as the explained",
            "scalar that query's **car logit** (`class_embed(decoder.norm(x))[car]`, LayerNorm scale held constant",
            "as LRP does): the score DETR ranks the detection by. Its token map is the matching combination of",
            "the per-feature maps of one `explain(model, [image], module=\"decoder\", layer=2, features=\"all\",",
            "queries=[q])` call.",
            "",
            f"- query box on a car (IoU >= 0.5): {faith['query_box_iou_ge_0.5']:.0%}",
            f"- pointing game: the most relevant token's patch overlaps the car box (= its centre inside the box "
            f"grown by half a token, 16 input px) in **{faith['pointing_cell']:.0%}** of the images; its centre "
            f"strictly inside the box in {faith['pointing_centre']:.0%}",
            "- deletion curve (encoder input tokens zeroed in order; curve = 1 + (target - initial) / |initial|, "
            f"mean over 0..100% deleted): most relevant first **{faith['deletion_auc_relevance']:.2f}**, random "
            f"order {faith['deletion_auc_random']:.2f}; relevance-first below random on "
            f"{faith['deletion_rel_below_random']:.0%} of the images",
            "",
        ]
        if faith_alt:
            lines += [
                f"With the query's largest-activation feature as the target instead (`--target max_activation`): "
                f"pointing {faith_alt['pointing_cell']:.0%} (patch) / {faith_alt['pointing_centre']:.0%} (centre), "
                f"deletion {faith_alt['deletion_auc_relevance']:.2f} vs random {faith_alt['deletion_auc_random']:.2f}. "
                "That single feature mostly encodes where the box edges are (its relevance lines up along the "
                "car's outline), so its maximum often sits just outside the box; the car logit is the "
                "quantity that says *car*.",
                "",
                "Why the `bar` class exists: in a first version without it, the class could be read off the box "
                "shape alone (only cars were wide), the model took its car evidence from tokens along the box "
                "edges and the pointing game reached only 68-78% (patch rule; both targets, also at 128 px "
                "input). With car-shaped bars that only wheels and cabin tell apart, the car evidence sits on "
                "the car.",
                "",
            ]
    lines += [
        "## How it was trained",
        "",
        "```bash",
        f"OMP_WAIT_POLICY=PASSIVE nice -n 15 {meta['command']}",
        "python -m lrp_ray.demo.evaluate --n 500              # the AP50 table above",
        "python -m lrp_ray.demo.faithfulness --n 100 --json f.json",
        "python -m lrp_ray.demo.training_md lrp_ray/assets/demo --faithfulness f.json   # this file",
        "```",
        "",
        f"- Measured: {meta['train_wall_seconds'] / 60:.1f} min wall clock, "
        f"{meta.get('train_cpu_seconds', float('nan')) / 60:.1f} min CPU time with {meta.get('threads', 2)} "
        f"threads, on a {meta.get('cpu_count')}-core {meta.get('machine')} CPU shared with other jobs "
        f"(torch {meta['torch']}); {a['steps']} steps of {a['batch']} scenes ({meta['scenes_seen']} scenes). "
        "`OMP_WAIT_POLICY=PASSIVE` (set by the script unless given) matters on a busy machine: spinning "
        "OpenMP threads made a step up to 10x slower.",
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
        "- The ResNet-18 (12 stem channels, res5 96) is trained from scratch with ordinary BatchNorm; for",
        "  every evaluation and for the checkpoint its affine parameters and running statistics are folded",
        "  into detectron2's FrozenBatchNorm2d buffers, which is how a detectron2 backbone is frozen (before",
        "  the last evaluation the statistics are re-estimated on 50 training batches, precise BN"
        + ("; the kept checkpoint is from that last evaluation)." if meta["best_step"] == a["steps"]
           else f"; the kept checkpoint, step {meta['best_step']}, is from before that re-estimation)."),
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
    ap.add_argument("--faithfulness", default=None, help="JSON of python -m lrp_ray.demo.faithfulness")
    ap.add_argument("--faithfulness-alt", default=None, help="the same with --target max_activation")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    meta = json.loads((folder / "train_metrics.json").read_text())
    faith = json.loads(Path(args.faithfulness).read_text()) if args.faithfulness else None
    alt = json.loads(Path(args.faithfulness_alt).read_text()) if args.faithfulness_alt else None
    (folder / "TRAINING.md").write_text(render(meta, faith, alt))
    print(f"wrote {folder / 'TRAINING.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
