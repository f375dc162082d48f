"""The bundled demo: a small DETR trained on generated scenes, sample images, and the tools that made them.

- :mod:`lrp_ray.demo.scenes`    deterministic scene generator (cars + distractor shapes)
- :mod:`lrp_ray.demo.train`     training (``python -m lrp_ray.demo.train --out lrp_ray/assets/demo``)
- :mod:`lrp_ray.demo.evaluate`  VOC AP50 on held-out scenes (``python -m lrp_ray.demo.evaluate``)
- :mod:`lrp_ray.demo.samples`   writes the shipped sample images + ``boxes.json``
- :mod:`lrp_ray.demo.faithfulness`  pointing game and deletion curves of LRP on the demo model
- :mod:`lrp_ray.demo.training_md`   writes ``assets/demo/TRAINING.md`` from the training metrics

How it was trained and how good it is: ``lrp_ray/assets/demo/TRAINING.md``.
"""

from __future__ import annotations

from pathlib import Path

from .scenes import CLASS_NAMES, HELDOUT_START

__all__ = ["CLASS_NAMES", "HELDOUT_START", "demo_dir", "demo_config_path", "demo_weights_path",
           "demo_images_dir"]


def demo_dir() -> Path:
    """``lrp_ray/assets/demo`` inside the installed package."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo"


def demo_config_path() -> Path:
    return demo_dir() / "config.yaml"


def demo_weights_path() -> Path:
    return demo_dir() / "model_final.pth"


def demo_images_dir() -> Path:
    return demo_dir() / "images"
