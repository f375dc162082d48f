"""A results folder as the report sees it: manifest, the scalar scan, detection outputs, errors.csv and
the health check -- everything read once and shared by the run page and the atlas."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrp_ray.results import Manifest, ManifestError, image_path, read_manifest

from .detect import Detections, read_detection_outputs
from .health import Health, check, read_errors
from .scan import Scan, scan

__all__ = ["Folder", "ReportError", "read_folder", "sweep_command"]


class ReportError(RuntimeError):
    """A results folder the report cannot be built from."""


@dataclass
class Folder:
    out: Path
    manifest: Manifest | None
    manifest_error: str | None
    images_root: Path | None
    scan: Scan
    det: Detections
    errors: list[tuple[str, str]]
    health: Health
    missing_images: list[str] = field(default_factory=list)


def _images_root(manifest: Manifest | None, given: str | Path | None, out: Path) -> Path | None:
    if given is not None:
        return Path(given)
    if manifest is not None and manifest.images_root and Path(manifest.images_root).is_dir():
        return Path(manifest.images_root)
    return out


def read_folder(out_dir: str | Path, images_root: str | Path | None = None, vectors: bool = True) -> Folder:
    """Read a results folder; :class:`ReportError` (one line) when there is nothing to show."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ReportError(f"results folder not found: {out}")
    try:
        manifest, manifest_error = read_manifest(out, strict=True), None
    except ManifestError as exc:
        manifest, manifest_error = None, f"manifest.json unreadable: {exc}"
    det = read_detection_outputs(out)
    if not (out / "relevance").is_dir() and not det.present:
        raise ReportError(f"no relevance dataset in {out} (expected {out / 'relevance'}/)")
    try:
        sc = scan(out, vectors=vectors)
    except Exception as exc:  # noqa: BLE001  (a corrupt part file: one line, not a traceback)
        raise ReportError(f"cannot read the relevance dataset in {out}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    if not len(sc.rows) and not det.present:
        raise ReportError(f"the relevance dataset in {out / 'relevance'} has no rows "
                          f"({len(sc.files)} part files)")
    root = _images_root(manifest, images_root, out)
    names = sorted(set(sc.rows["image"].astype(str))) if len(sc.rows) else []
    if det.detections is not None:
        names = sorted(set(names) | set(det.detections["image"].astype(str)))
    missing = [n for n in names if root is None or not image_path(root, n).is_file()]
    errors = read_errors(out)
    health = check(sc.rows, manifest, manifest_error, errors, missing)
    for e in det.errors:
        health.add(e, level="error")
    return Folder(out=out, manifest=manifest, manifest_error=manifest_error, images_root=root, scan=sc,
                  det=det, errors=errors, health=health, missing_images=missing)


RUN_KEYS = {"description", "out", "actors", "gpus_per_actor", "cpus_per_actor", "device", "compile",
             "address", "resume", "overwrite", "heatmaps", "cache_budget_mb", "max_in_flight",
             "max_item_retries", "max_system_retries", "ping_timeout_s", "start_timeout_s"}
"""Spec keys that decide how a sweep runs, not what it computes."""


def _defaults() -> dict[str, Any]:
    from lrp_ray.sweep.spec import SweepSpec

    return {k: f.get_default(call_default_factory=True) for k, f in SweepSpec.model_fields.items()}


def sweep_command(manifest: Manifest | None, out: Path, **override: Any) -> str:
    """The ``python -m lrp_ray.sweep`` command of the request in the manifest (``override``: keys to
    replace, e.g. one module/layer/feature: that request gets its own folder, ``OUT-<module>-<layer>-
    <feature>``, since OUT holds the whole run's). Keys at their defaults are left out, so the command is
    what was asked and runs as it reads; "n/a" without a recorded request."""
    if manifest is None or not manifest.spec:
        return "n/a (no request recorded in manifest.json)"
    spec = dict(manifest.spec)
    spec.update(override)
    defaults = _defaults()
    args = ["python", "-m", "lrp_ray.sweep"]
    for k, v in spec.items():
        if (k in RUN_KEYS and k != "heatmaps") or v is None or v == [] or v == "" or v == defaults.get(k):
            continue
        flag = "--" + k.replace("_", "-")
        if k == "overrides":
            for o in v:
                args += ["--opt", str(o)]
        elif isinstance(v, bool):
            if v:
                args.append(flag)
        elif k == "detections" and isinstance(v, (list, tuple)):  # (query, class) pairs
            args += [flag, ",".join(f"{int(p[0])}:{int(p[1])}" for p in v)]
        elif isinstance(v, (list, tuple)):
            args += [flag, ",".join(map(str, v))]
        else:
            args += [flag, str(v)]
    target = str(spec.get("out") or out)
    if override:
        target += "-" + "-".join(str(override[k]) for k in ("module", "layers", "features") if k in override)
    args += ["--out", target]
    return " ".join(shlex.quote(a) for a in args)
