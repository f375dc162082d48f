"""Preparing a sweep: everything that can fail because of the request, before Ray or any actor starts.

Resolves OUT, finds and validates the images, loads the model (config + weights), checks the index
ranges, makes the plan and the :class:`~lrp_ray.sweep.spec.ResultSpec` whose digest guards resuming.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import interrupts
from .errors import BadRequest, one_line
from .images import (
    DEMO_IMAGES,
    ImageError,
    ImageInfo,
    discover,
    duplicate_groups,
    validate,
    write_synthetic_images,
)
from .indices import check_queries, format_indices, resolve_indices, targets_per_feature
from .lock import LOCK_NAME, OutputLock
from .plan import Plan, make_plan
from .sink import OWNED_NAMES, read_manifest
from .spec import ResultSpec, RunSpec, SweepSpec

__all__ = ["Prepared", "prepare", "resolve_out", "in_ray_job", "RESULTS_ROOT_ENV"]

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RESULTS_ROOT_ENV = "LRP_RAY_RESULTS"
"""Inside a Ray job, a relative --out is resolved against this folder (default ``~/lrp_ray_results``)."""


@dataclass
class Prepared:
    """A validated request, ready to run."""

    spec: SweepSpec
    run: RunSpec
    result: ResultSpec
    hash: str
    out: Path
    out_note: str
    image_root: Path
    images: list[ImageInfo]
    errors: list[ImageError]
    duplicates: list[list[str]]
    model_cfg: Any
    state: dict
    dims: dict[str, int]
    plan: Plan
    resumed: bool
    old_manifest: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    lock: OutputLock | None = None
    """The lock on OUT, held from the end of :func:`prepare` to the end of ``execute``."""

    def release(self) -> None:
        """Give up OUT (``execute`` does this when it ends; call it to drop a prepared sweep unrun)."""
        if self.lock is not None:
            self.lock.release()


def in_ray_job() -> bool:
    """True when running as the entrypoint of ``ray job submit`` (its working dir is temporary)."""
    return JOB_ENV in os.environ


def resolve_out(out: str) -> tuple[Path, str]:
    """OUT as an absolute folder path, and a note when it was resolved somewhere unexpected."""
    if "://" in out:
        raise BadRequest(f"--out {out}: must be a folder path on the driver's machine "
                         "(URIs are not supported)")
    p = Path(out).expanduser()
    note = ""
    if not p.is_absolute():
        if in_ray_job():
            base = Path(os.environ.get(RESULTS_ROOT_ENV, "~/lrp_ray_results")).expanduser().resolve()
            p = base / p
            note = (f"relative --out inside a Ray job resolved against {base} (the job's working dir is "
                    f"temporary; set ${RESULTS_ROOT_ENV} or pass an absolute --out)")
        else:
            p = Path.cwd() / p
    p = Path(os.path.abspath(p))
    if p.exists() and not p.is_dir():
        raise BadRequest(f"--out {out}: is a file; give a folder (new or from an earlier sweep)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadRequest(f"--out {out}: {parent} is a file, not a folder")
            break
    return p, note


def _load_model(spec: SweepSpec, log_fn: Callable[[str], None]) -> Any:
    import torch

    from lrp_ray.models import load_model

    for flag, value in (("--config", spec.config), ("--weights", spec.weights)):
        if value is not None and not Path(value).expanduser().is_file():
            what = "is a folder, not a file" if Path(value).expanduser().is_dir() else "file not found"
            raise BadRequest(f"{flag} {value}: {what}")
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_model(spec.config, spec.weights, list(spec.overrides), device="cpu")
        for w in caught:
            log_fn(f"note: {w.message}")
        return model
    except (FileNotFoundError, PermissionError) as exc:
        raise BadRequest(one_line(exc)) from None
    except Exception as exc:  # ConfigError, CheckpointError (weights that do not fit), ...
        kind = type(exc).__name__
        what = "model"
        if spec.weights and "heckpoint" in kind:
            what = "--weights"
        elif "Config" in kind and str(exc).startswith("invalid override"):
            what = "--opt"
        elif spec.config and "Config" in kind and str(Path(spec.config).expanduser()) in str(exc):
            what = "--config"
        raise BadRequest(f"{what}: {one_line(exc, 1200)}") from None


def _weights_digest(state: dict) -> str:
    """sha256 of the weights the actors get (names, dtypes, shapes, values): also covers the bundled demo
    checkpoint and the seeded random weights of a config without a checkpoint."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = state[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _numerics(model: Any, spec: SweepSpec) -> dict[str, Any]:
    """The engine's constants that decide its arithmetic for this request (part of the result's hash)."""
    from lrp_ray.lrp import EngineConfig, LrpEngine

    engine = LrpEngine(model, EngineConfig(rules=spec.rules, epsilon=spec.epsilon, precision=spec.precision,
                                           device="cpu"))
    return engine.numerics()


def _schema_version() -> int:
    from lrp_ray.results import SCHEMA_VERSION

    return int(SCHEMA_VERSION)


def _check_out(out: Path, run: RunSpec) -> Any:
    """OUT may be new, empty, or hold an earlier sweep of ours (resume) unless --overwrite."""
    manifest = read_manifest(out)
    nonempty = out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())
    if nonempty and manifest is None and not run.overwrite:
        ours = [n for n in OWNED_NAMES if (out / n).exists()]
        what = "results of an unfinished or unknown sweep" if ours else "other files"
        raise BadRequest(f"--out {out}: folder is not empty ({what}, no manifest.json); choose an empty or "
                         "new folder, or pass --overwrite")
    if not run.resume and not run.overwrite and manifest is not None:
        raise BadRequest(f"--out {out}: holds an earlier sweep; resume it (default) or pass --overwrite")
    return manifest


def prepare(spec: SweepSpec, log_fn: Callable[[str], None] = print) -> Prepared:
    """Everything that can fail because of the request, before Ray or any actor starts."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run = spec.run_spec()
    out, note = resolve_out(run.out)
    manifest = _check_out(out, run)

    if spec.images is not None:
        image_set = discover(spec.images, exclude=out)
    elif DEMO_IMAGES.is_dir() and any(DEMO_IMAGES.iterdir()):
        image_set = discover(str(DEMO_IMAGES))
    else:
        image_set = discover(str(write_synthetic_images(out / "_cache" / "synthetic_images")))
    timings["discover"] = time.perf_counter() - t0
    interrupts.check()

    t1 = time.perf_counter()
    model = _load_model(spec, log_fn)
    interrupts.check()
    from lrp_ray.models import from_module

    parts = from_module(model)
    dims = {"encoder": len(parts.transformer.encoder.layers),
            "decoder": len(parts.transformer.decoder.layers),
            "hidden_dim": int(parts.hidden_dim), "num_queries": int(parts.num_queries)}
    layers = {m: resolve_indices(spec.layers, dims[m], f"{m} layers") for m in spec.modules}
    if spec.feature_targets:
        features = resolve_indices(spec.features, dims["hidden_dim"], "features")
        queries = check_queries(spec.queries, dims["num_queries"]) if "decoder" in spec.modules else None
    else:
        features, queries = [], None
    detections = _detection_request(spec, parts) if spec.detection_targets else None
    pixels = _pixel_request(spec, model) if spec.pixels else None
    state = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    cfg = model.cfg
    numerics = _numerics(model, spec)
    timings["model_load"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    ok, bad = validate(image_set)
    timings["validate_images"] = time.perf_counter() - t2
    interrupts.check()

    per_feature = {"encoder": 1}
    if queries is not None:
        per_feature["decoder"] = targets_per_feature(queries, dims["num_queries"])
    result = ResultSpec(
        schema_version=_schema_version(), model=cfg.model_dump(mode="json"),
        weights_sha256=_weights_digest(state), numerics=numerics,
        images=[(i.name, i.sha1) for i in ok], batch_size=spec.batch_size, layers=layers,
        features=format_indices(features) if spec.feature_targets else "none", queries=queries,
        item_features=spec.item_features, rules=spec.rules, epsilon=spec.epsilon, precision=spec.precision,
        detections=detections, pixels=pixels)
    digest = result.digest()
    t3 = time.perf_counter()
    plan = make_plan([i.name for i in ok], spec.batch_size, layers, features, spec.item_features, per_feature,
                     tag=digest, detection_datasets=_detection_datasets(detections))
    timings["plan"] = time.perf_counter() - t3

    lock = OutputLock(out).acquire()  # from here on this process owns OUT, until execute() ends
    try:
        manifest = _check_out(out, run)  # again, under the lock: another run may have finished meanwhile
        resumed = _resumable(out, run, manifest, result, digest)
    except BaseException:
        lock.release()
        raise
    timings["prepare"] = time.perf_counter() - t0
    return Prepared(spec=spec, run=run, result=result, hash=digest, out=out, out_note=note,
                    image_root=image_set.root, images=ok, errors=bad, duplicates=duplicate_groups(ok),
                    model_cfg=cfg, state=state, dims=dims, plan=plan, resumed=resumed,
                    old_manifest=manifest, timings=timings, lock=lock)


def _class_names(spec: SweepSpec) -> list[str] | None:
    """The request's class names: a list, a text file (one name per line), or the demo's for the demo."""
    names = spec.class_names
    if names is None:
        if spec.config is None and spec.weights is None:
            from lrp_ray.demo import CLASS_NAMES

            return list(CLASS_NAMES)
        return None
    if isinstance(names, list):
        return [str(n) for n in names]
    path = Path(names).expanduser()
    if not path.is_file():
        raise BadRequest(f"class_names {names}: {'is a folder' if path.is_dir() else 'file not found'}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"class_names {names}: cannot read it ({one_line(exc, 200)})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _check_class_names(names: list[str], source: Any) -> None:
    """One name per class id: none empty, none twice (a name must say which class it is)."""
    for k, name in enumerate(names):
        if not name:
            raise BadRequest(f"class_names {source}: class {k} has an empty name (line {k + 1})")
    seen: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in seen:
            raise BadRequest(f"class_names {source}: {name!r} names classes {seen[name]} and {k}")
        seen[name] = k


def _detection_request(spec: SweepSpec, parts: Any) -> dict[str, Any]:
    """The detection targets as part of the result spec: the checked selection (class names resolved to
    ids), top_concepts, class names and whether faithfulness is computed."""
    from lrp_ray.lrp.detections import parse_selection, resolve_class_name

    names = _class_names(spec)
    if names is not None:
        _check_class_names(names, spec.class_names if isinstance(spec.class_names, str) else "list")
    n_classes = int(parts.class_embed.weight.shape[0]) - 1
    if names is not None and len(names) < n_classes:
        raise BadRequest(f"class_names: {len(names)} names for a model with {n_classes} classes")
    try:
        selection = resolve_class_name(spec.detections, names)
        parse_selection(selection, int(parts.num_queries), n_classes)
    except ValueError as exc:
        raise BadRequest(one_line(exc, 600)) from None
    if not isinstance(selection, str):
        selection = [list(p) for p in selection]
    return {"selection": selection, "top_concepts": int(spec.top_concepts), "class_names": names,
            "faithfulness": bool(spec.faithfulness)}


def _pixel_request(spec: SweepSpec, model: Any) -> dict[str, Any]:
    """Pixel maps as part of the result spec: how many reference rows per feature, the backbone
    propagator's identity (composite, its parameters, zennit version, dtype, chunk budget, path) and the
    map size."""
    from lrp_ray.lrp import EngineConfig, LrpEngine
    from lrp_ray.pixels import propagator_for, resolve_composite
    from lrp_ray.queries import top_k

    if not spec.feature_targets:
        raise BadRequest("pixels: pixel maps are computed for feature targets (--target features or both)")
    try:
        resolve_composite(spec.pixel_composite)
        engine = LrpEngine(model, EngineConfig(rules=spec.rules, epsilon=spec.epsilon,
                                               precision=spec.precision, device="cpu"))
        identity = propagator_for(engine, spec.pixel_composite).identity()
    except ValueError as exc:
        raise BadRequest(f"pixel_composite: {one_line(exc, 300)}") from None
    return {"top": int(top_k(spec.pixels)), "composite": identity, "max_side": int(spec.pixel_max_side)}


def _detection_datasets(detections: dict[str, Any] | None) -> tuple[str, ...]:
    """Datasets a detection item writes, in commit order (``detections`` last)."""
    if detections is None:
        return ()
    extra = ("faithfulness",) if detections["faithfulness"] else ()
    return ("concepts", "concept_maps", *extra, "detections")


def _resumable(out: Path, run: RunSpec, manifest: Any, result: ResultSpec, digest: str) -> bool:
    """Whether OUT holds earlier results of this very request (refused when it holds another's)."""
    if manifest is None or run.overwrite:
        return False
    if manifest.spec_hash != digest:
        diff = result.differences(manifest.result_spec)
        raise BadRequest(f"--out {out}: holds results of a different sweep (differs in: {', '.join(diff)}); "
                         "use another --out or pass --overwrite")
    return True
