"""The feature atlas: ``OUT/atlas/index.html`` (every swept feature, sortable and filterable) and one
page per feature, ``OUT/atlas/features/<module>-<layer>-<feature>.html``, with its pictures under
``OUT/atlas/img/<slug>/`` and the CSS/JS under ``OUT/atlas/static/``.

Incremental: ``OUT/atlas/state.json`` keeps each feature's signature (its rows' scalars, the detection
rankings, the settings); a rebuild draws pictures only for features whose signature changed or whose files
are missing, and rewrites a page only when its HTML changed. Pages of features no longer in the folder are
removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrp_ray.results import atomic_write_text

from .features import Feature, Settings, build_features, pixel_index
from .folder import Folder, read_folder, sweep_command
from .health import Problem
from .pages import copy_static, render, write_if_changed
from .paths import ATLAS_DIR
from .render import MapJob, MapTask, default_workers, run_tasks

log = logging.getLogger(__name__)

__all__ = ["AtlasResult", "build_atlas", "STATE_NAME"]

STATE_NAME = "state.json"


@dataclass
class AtlasResult:
    index: Path
    features: list[Feature]
    rendered: int = 0                   # features whose pictures were (re)drawn
    pictures: int = 0                   # picture files written
    pages_written: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)


def _load_state(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.get("features", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _tasks(folder: Folder, todo: list[Feature]) -> list[Any]:
    by_file: dict[int, dict[str, MapJob]] = {}
    by_layer: dict[tuple, dict[str, MapJob]] = {}
    by_pixels: dict[str, dict[str, MapJob]] = {}
    for f in todo:
        for where, job in f.jobs:
            if isinstance(where, tuple) and where[0] == "pixels":
                target = by_pixels.setdefault(str(where[1]), {})
            elif isinstance(where, tuple):
                target = by_layer.setdefault(where, {})
            else:
                target = by_file.setdefault(where, {})
            target.setdefault(job.dest, job)
    tasks: list[Any] = [MapTask(path=str(folder.scan.files[i]), source="relevance", jobs=list(j.values()))
                        for i, j in sorted(by_file.items())]
    tasks += [MapTask(path=str(folder.out), source="concept_maps", jobs=list(j.values()))
              for _, j in sorted(by_layer.items(), key=lambda kv: str(kv[0]))]
    tasks += [MapTask(path=path, source="pixels", jobs=list(j.values()))
              for path, j in sorted(by_pixels.items())]
    return tasks


def _provenance(folder: Folder) -> list[tuple[str, Any]]:
    m = folder.manifest
    if m is None:
        return [("manifest", folder.manifest_error or "no manifest.json")]
    rs = m.result_spec or m.result_key or {}
    cfg = m.detr_config() or {}
    model = ", ".join(f"{k} {cfg[k]}" for k in ("meta_architecture", "hidden_dim", "enc_layers", "dec_layers",
                                                  "num_queries", "num_classes", "resnet_depth") if k in cfg)
    return [("status", m.status), ("request digest (spec_hash)", m.spec_hash or "n/a"),
            ("model weights sha256", rs.get("weights_sha256", "n/a")), ("model", model or "n/a"),
            ("config", m.spec.get("config") or "bundled demo"),
            ("weights", m.spec.get("weights") or "bundled demo"),
            ("rules / epsilon / precision", f"{rs.get('rules', m.spec.get('rules'))} / "
                                            f"{rs.get('epsilon', m.spec.get('epsilon'))} / "
                                            f"{rs.get('precision', m.spec.get('precision'))}"),
            ("images root", m.images_root or "n/a"),
            ("lrp_ray", m.versions.get("lrp_ray", "n/a"))]


def build_atlas(out_dir: str | Path, images_root: str | Path | None = None, *, top: int = 8,
                workers: int | None = None, force: bool = False, folder: Folder | None = None,
                settings: Settings | None = None, run_page: str = "../report.html",
                progress: Callable[[int, int], None] | None = None) -> AtlasResult:
    """Build (or update) ``OUT/atlas``; returns what was done. ``top``: reference images per ranking;
    ``workers``: processes for the pictures (default: the CPUs, at most 8; 0 or 1: this process);
    ``force``: redraw every picture."""
    t0 = time.perf_counter()
    folder = folder if folder is not None else read_folder(out_dir, images_root, vectors=False)
    settings = settings or Settings(top=top)
    atlas = folder.out / ATLAS_DIR
    features = build_features(folder.scan.rows, folder.det, settings,
                              folder.manifest.input_geometry() if folder.manifest else (None, None),
                              pixel_index(folder.out))
    for f in features:
        f.incomplete = f.key in folder.health.incomplete_features
    state_path = atlas / STATE_NAME
    state = {} if force else _load_state(state_path)
    todo = [f for f in features
            if state.get(f.slug) != f.signature or not all((atlas / p).is_file() for p in f.files())]
    result = AtlasResult(index=atlas / "index.html", features=features, rendered=len(todo))
    problems = list(folder.health.problems)
    if todo:
        done = run_tasks(_tasks(folder, todo), str(folder.images_root) if folder.images_root else None,
                         atlas, workers=default_workers() if workers is None else workers, progress=progress)
        result.pictures = done.written
        if done.failed:
            problems.append(Problem(f"{len(done.failed)} pictures could not be drawn", done.failed[:200],
                                    "error"))
        new_missing = sorted(done.missing_images - set(folder.missing_images))
        if new_missing:
            problems.append(Problem(f"{len(new_missing)} images could not be read: drawn on a gray canvas",
                                    new_missing[:200]))
    # Stale pages and pictures (features no longer in the folder).
    slugs = {f.slug for f in features}
    for p in (atlas / "features").glob("*.html") if (atlas / "features").is_dir() else []:
        if p.stem not in slugs:
            p.unlink()
    files = {p for f in features for p in f.files()}
    for d in (atlas / "img").iterdir() if (atlas / "img").is_dir() else []:
        if d.is_dir() and d.name not in slugs:
            shutil.rmtree(d, ignore_errors=True)
        elif d.is_dir():  # pictures this feature no longer shows
            for p in d.iterdir():
                if p.is_file() and f"img/{d.name}/{p.name}" not in files:
                    p.unlink()
    copy_static(atlas / "static")
    title = folder.out.resolve().name
    n_images = folder.scan.rows["image"].nunique() if len(folder.scan.rows) else 0
    classes = _index_classes(folder)
    command = sweep_command(folder.manifest, folder.out)
    provenance = _provenance(folder)
    feat_problems = [p for p in problems if p.level == "error"]
    for i, f in enumerate(features):
        prev = features[i - 1] if i > 0 and features[i - 1].module == f.module \
            and features[i - 1].layer == f.layer else None
        nxt = features[i + 1] if i + 1 < len(features) and features[i + 1].module == f.module \
            and features[i + 1].layer == f.layer else None
        own = [Problem(f"this feature has {f.n_images} of the run's {n_images} images")] \
            if f.incomplete else []
        html = render("feature.html", f=f, prev=prev, next=nxt, title=title, run_page="../" + run_page,
                      problems=own + feat_problems[:3], provenance=provenance, command=command,
                      command_one=sweep_command(folder.manifest, folder.out, module=f.module,
                                                layers=str(f.layer), features=str(f.feature)))
        result.pages_written += write_if_changed(atlas / f.page, html)
    html = render("index.html", features=features, title=title, problems=problems, classes=classes,
                  modules=sorted({f.module for f in features}, key=lambda m: ({"encoder": 0, "decoder": 1}
                                                                              .get(m, 2), m)),
                  layers=sorted({f.layer for f in features}), n_layers=len({(f.module, f.layer)
                                                                            for f in features}),
                  n_images=n_images, run_page=run_page)
    result.pages_written += write_if_changed(result.index, html)
    # a feature drawn on a gray canvas (its image unreadable) is drawn again once the image is back
    gray = set(folder.missing_images) | (done.missing_images if todo else set())
    state_out = {f.slug: f.signature for f in features if all((atlas / p).is_file() for p in f.files())
                 and not any(j.image in gray for _, j in f.jobs)}
    atomic_write_text(state_path, json.dumps({"version": 1, "features": state_out}, indent=0) + "\n")
    result.problems = problems
    result.seconds = time.perf_counter() - t0
    return result


def _index_classes(folder: Folder, limit: int = 12) -> list[str]:
    """The classes shown as index columns: those with the most explained detections."""
    by = folder.det.by_class
    if by is None or not len(by):
        return []
    from .detect import class_label

    lab = by.assign(label=[class_label(i, n) for i, n in zip(by["class_id"], by["class_name"], strict=True)])
    counts = lab.groupby("label")["detections"].max().sort_values(ascending=False, kind="stable")
    return [str(c) for c in counts.index[:limit]]
