"""Shared helpers for the benchmarks: R50-shaped model, images, peak-RSS sampling, result files."""

from __future__ import annotations

import json
import platform
import threading
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import psutil
import torch

from lrp_ray.models import DetrConfig, build_model

RESULTS = Path(__file__).resolve().parent / "results"


def r50_model(seed: int = 0, **overrides):
    """DETR-R50 (DETR's detectron2 config shapes) with random weights."""
    torch.manual_seed(seed)
    cfg = DetrConfig().with_overrides({"INPUT.MIN_SIZE_TEST": 480, "INPUT.MAX_SIZE_TEST": 640, **overrides})
    return build_model(cfg)


def images(n: int, h: int = 480, w: int = 640, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` over a ``measure()`` block (bytes)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.proc = psutil.Process()
        self.interval = interval

    @contextmanager
    def measure(self):
        stats = {"start": self.proc.memory_info().rss, "peak": 0}
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                stats["peak"] = max(stats["peak"], self.proc.memory_info().rss)
                time.sleep(self.interval)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            yield stats
        finally:
            stop.set()
            t.join()
            stats["peak"] = max(stats["peak"], self.proc.memory_info().rss)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": date.today().isoformat()}


def write(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
