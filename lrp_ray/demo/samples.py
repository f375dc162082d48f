"""The sample images shipped in ``lrp_ray/assets/demo/images`` (and their ``boxes.json``).

    python -m lrp_ray.demo.samples [--out lrp_ray/assets/demo/images]

Held-out scenes (indices from ``SAMPLE_START``, disjoint from training, validation and the test range
used for the reported AP50 and the faithfulness tests) at fixed sizes and aspect ratios, saved as PNG or
JPEG. Only scenes with at least one car are used, so every sample has something for the demo model to
find. ``boxes.json`` maps each file name to its ground truth: ``boxes`` (xyxy pixels), ``labels`` (class
ids) and ``classes`` (names).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .scenes import CAR, CLASS_NAMES, generate_scene

SAMPLE_START = 900_000
# (file name, (height, width)): landscape, portrait, square, wide and tall, PNG and JPEG.
SAMPLES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("scene_01.png", (120, 180)),
    ("scene_02.jpg", (176, 112)),
    ("scene_03.png", (144, 144)),
    ("scene_04.jpg", (96, 192)),
    ("scene_05.png", (192, 128)),
    ("scene_06.jpg", (150, 170)),
    ("scene_07.png", (104, 160)),
)


def sample_scenes():
    """(file name, Scene) of every shipped sample (deterministic)."""
    out = []
    index = SAMPLE_START
    for name, size in SAMPLES:
        while True:
            sc = generate_scene(index, size=size)
            index += 1
            if (sc.labels == CAR).any():
                break
        out.append((name, sc))
    return out


def write_samples(dest: str | Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, sc in sample_scenes():
        im = Image.fromarray(sc.image)
        if name.endswith(".jpg"):
            im.save(dest / name, quality=92, optimize=True)
        else:
            im.save(dest / name, optimize=True)
        truth[name] = {"scene_index": sc.index, "height": sc.size[0], "width": sc.size[1],
                       "boxes": [[round(float(v), 1) for v in b] for b in sc.boxes],
                       "labels": [int(v) for v in sc.labels],
                       "classes": [CLASS_NAMES[int(v)] for v in sc.labels]}
    (dest / "boxes.json").write_text(json.dumps({"class_names": list(CLASS_NAMES), "images": truth},
                                                indent=1) + "\n")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrp_ray.demo.samples", description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parent.parent / "assets" / "demo" / "images"
    ap.add_argument("--out", default=str(default))
    args = ap.parse_args(argv)
    print(f"wrote samples to {write_samples(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
