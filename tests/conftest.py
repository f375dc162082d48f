"""Shared test setup: one local Ray instance per pytest session (2 CPUs, 127.0.0.1) for in-process sweep
tests, a tiny DETR (as config overrides of the demo stand-in) and tiny image folders.

Subprocess tests (CLI, ray job submit, multi-node) start their own Ray; the in-process instance is
private to this process (``address="local"``), so they do not collide.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Before ray is imported anywhere: no usage stats, and a local instance binds to 127.0.0.1.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray workers and subprocesses import lrp_ray from this checkout even when it is not pip-installed.
_pp = os.environ.get("PYTHONPATH", "")
if str(REPO) not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + _pp if _pp else "")

TINY_OVERRIDES = [
    "MODEL.RESNETS.DEPTH=18", "MODEL.RESNETS.STEM_OUT_CHANNELS=8", "MODEL.RESNETS.RES2_OUT_CHANNELS=8",
    "MODEL.DETR.HIDDEN_DIM=32", "MODEL.DETR.NHEADS=4", "MODEL.DETR.DIM_FEEDFORWARD=64",
    "MODEL.DETR.ENC_LAYERS=2", "MODEL.DETR.DEC_LAYERS=2", "MODEL.DETR.NUM_OBJECT_QUERIES=5",
    "MODEL.DETR.NUM_CLASSES=3", "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=128",
]
"""A tiny DETR (ResNet-18 x 8 channels, hidden 32, 2+2 layers, 5 queries; images resized to 64 px) as
overrides of DETR's defaults; with a config and no weights, models get random weights (seed 0)."""


TINY_SIZES = {"a.jpg": (64, 96), "b.png": (96, 64), "sub/c.png": (80, 80), "sub/deeper/d.bmp": (64, 64),
              "e.webp": (72, 110)}


def write_images(folder: Path, sizes: dict[str, tuple[int, int]] = TINY_SIZES, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(p, quality=95) if p.suffix == ".jpg" else Image.fromarray(arr).save(p)
    return folder


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """Five small images of different sizes, nested folders, several formats."""
    return write_images(tmp_path_factory.mktemp("tiny_images"))


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """detectron2-style config.yaml of the tiny DETR (independent of the bundled demo model)."""
    from lrp_ray.models import load_config

    path = tmp_path_factory.mktemp("tiny_model") / "config.yaml"
    load_config(None, TINY_OVERRIDES).to_yaml(path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for every in-process sweep test of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            **popen):
    """``python -m lrp_ray.sweep ARGS`` in a subprocess (its own local Ray)."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lrp_ray.sweep", *args], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout, **popen)


# --------------------------------------------------------------------------- sweeps and their rows
KEY = ["module", "layer", "image", "feature", "query"]
LIST_COLUMNS = ("token_map", "channel_relevance", "profile")


def tiny_spec(out, images, config, **kw):
    """The in-process tiny sweep: 5 images in 3 batches, features 0-5 in chunks of 3, both modules, top2."""
    from lrp_ray.sweep import SweepSpec

    base = dict(images=str(images), config=str(config), out=str(out), batch_size=2, features="0-5",
                feature_chunk=3, actors=2, queries="top2", ping_timeout_s=20, device="cpu")
    return SweepSpec(**{**base, **kw})


def load_rows(out: Path, columns: list[str] | None = None):
    """Every row of ``out/relevance``, sorted by (module, layer, image, feature, query); query -1 = null."""
    import pandas as pd

    df = pd.read_parquet(out / "relevance", columns=columns)
    df["module"] = df["module"].astype(str)
    df["layer"] = df["layer"].astype(int)
    df["query"] = df["query"].fillna(-1).astype(int)
    return df.sort_values(KEY).reset_index(drop=True)


def assert_rows_equal(a, b) -> None:
    """Same rows, every value exactly equal (the engine is deterministic per work item: same request,
    same fp32 CPU arithmetic, whatever ran before, on which actor, or in which process)."""
    import pandas as pd

    assert len(a) == len(b)
    assert set(a.columns) == set(b.columns)
    pd.testing.assert_frame_equal(a[KEY], b[KEY])
    for col in a.columns:
        if col in LIST_COLUMNS:
            bad = [i for i, (x, y) in enumerate(zip(a[col], b[col], strict=True)) if not np.array_equal(x, y)]
            assert not bad, f"{col}: {len(bad)} rows differ, first {a.loc[bad[0], KEY].to_dict()}"
        else:
            eq = (a[col].values == b[col].values)
            assert eq.all(), f"{col}: {int((~eq).sum())} rows differ"


@pytest.fixture(scope="session")
def sweep_reference(ray_session, tiny_images, tiny_config, tmp_path_factory):
    """An uninterrupted in-process tiny sweep (:func:`tiny_spec`); tests must not modify its folder."""
    from lrp_ray.sweep import run_sweep

    out = tmp_path_factory.mktemp("reference") / "out"
    lines: list[str] = []
    res = run_sweep(tiny_spec(out, tiny_images, tiny_config), log_fn=lines.append, progress=False)
    return out, res, lines


def drop_dac_override() -> None:
    """``preexec_fn`` for a subprocess that must honour file permissions even when run as root: drops
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set (so the exec'd program does not get
    them); a no-op for other users (who cannot, and need not, drop them)."""
    import ctypes

    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(pr_capbset_drop, cap, 0, 0, 0)


@pytest.fixture()
def no_ray(monkeypatch):
    """Fails the test if the sweep gets as far as starting or joining Ray (so no actor can start)."""
    from lrp_ray.sweep import cluster

    def refuse(*a, **k):
        raise AssertionError("a bad request reached Ray")

    monkeypatch.setattr(cluster, "connect", refuse)
