"""``OUT/manifest.json``: what a sweep was asked, how it ran, and which output format it wrote.

:class:`Manifest` types what the sweep writes; :func:`read_manifest` is the one reader (a manifest
without ``version`` is version 1) and :func:`write_manifest` the one writer (atomic, refuses keys the
model does not know, so a typo cannot slip into the format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .files import atomic_write_text
from .schema import SCHEMA_VERSION

__all__ = ["Manifest", "ModelInfo", "Selection", "RunInfo", "Counts", "PeakMemory", "HeatmapsInfo",
           "ManifestError", "STATUSES", "MANIFEST_NAME", "read_manifest", "write_manifest"]

MANIFEST_NAME = "manifest.json"
STATUSES = ("running", "complete", "incomplete", "interrupted", "output_error")
"""Values of :attr:`Manifest.status` the sweep writes."""


class ManifestError(ValueError):
    """A manifest.json that cannot be read or written."""


class _Part(BaseModel):
    """A section of the manifest: typed keys; unknown keys are kept when reading (other versions)."""

    model_config = ConfigDict(extra="allow")


class ModelInfo(_Part):
    dims: dict[str, int] = Field(default_factory=dict, description="encoder/decoder layers, hidden_dim, "
                                                                   "num_queries")
    config: dict[str, Any] | None = Field(None, description="the DetrConfig as loaded")


class Selection(_Part):
    layers: dict[str, str] = Field(default_factory=dict, description="module -> layer indices ('0-5')")
    features: str | None = None
    queries: str | list[int] | None = None


class RunInfo(_Part):
    ray: str | None = None
    nodes: list[str] = Field(default_factory=list)
    actors: int = 0
    device: str | None = None
    actors_info: list[dict[str, Any]] = Field(default_factory=list)


class Counts(_Part):
    images_found: int | None = None
    images_ok: int | None = None
    images_failed: int | None = None
    batches: int | None = None
    items_total: int | None = None
    items_skipped_resume: int | None = None
    items_run: int | None = None
    items_failed: int | None = None
    items_missing: int | None = Field(None, description="planned parts not found (or short) on disk at the "
                                                         "end: 'complete' only when 0")
    maps_total: int | None = None
    maps_run: int | None = None
    rows_written_this_run: int | None = None
    summary_rows: int | None = None


class PeakMemory(_Part):
    driver_rss: int | None = None
    actors: dict[str, Any] = Field(default_factory=dict)


class HeatmapsInfo(_Part):
    dir: str
    files: int = 0
    seconds: float = 0.0
    error: str | None = Field(None, description="why the requested heatmaps were not (all) rendered")


class Manifest(_Part):
    """``OUT/manifest.json``. Sections that only a finished run knows (``run``, ``counts``, ...) are None
    while it is ``running``."""

    version: int = Field(SCHEMA_VERSION, description="output format version (rows and manifest)")
    status: str = Field("running", description=f"one of {', '.join(STATUSES)}")
    spec: dict[str, Any] = Field(default_factory=dict, description="the request as given")
    spec_hash: str | None = Field(None, description="digest of result_spec (guards resuming)")
    result_spec: dict[str, Any] | None = Field(None, description="what decides the numbers and rows")
    run_spec: dict[str, Any] | None = Field(None, description="how it was run")
    result_key: dict[str, Any] | None = Field(None, description="version 1's result_spec")
    out: str | None = None
    images_root: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    model: ModelInfo = Field(default_factory=ModelInfo)
    selection: Selection = Field(default_factory=Selection)
    duplicate_images: list[list[str]] = Field(default_factory=list)
    run: RunInfo | None = None
    counts: Counts | None = None
    forward_passes: int | None = None
    cache: dict[str, int] | None = None
    reliability: dict[str, int] | None = None
    failed_items: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    peak_memory: PeakMemory | None = None
    profile_names: dict[str, list[str]] = Field(default_factory=dict, description="'module/layer' -> "
                                                                                  "names of the profile")
    heatmaps: HeatmapsInfo | None = None
    detections: dict[str, Any] | None = Field(None, description="detection targets: detections explained "
                                              "(per class), images without one, faithfulness means")
    pixels: dict[str, Any] | None = Field(None, description="pixel maps: reference rows per feature (top), "
                                          "composite identity, max_side, maps planned and computed")
    history: list[dict[str, Any]] = Field(default_factory=list, description="earlier runs into this "
                                          "folder, oldest first: status, run, counts, timings")

    def detr_config(self) -> dict[str, Any] | None:
        """The model config the results were computed with (``model.config``, else the result spec's)."""
        if self.model.config:
            return self.model.config
        for spec in (self.result_spec, self.result_key):
            if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
                return spec["model"]
        return None

    def input_geometry(self) -> tuple[tuple[int, int] | None, int | None]:
        """``(min_size_test, max_size_test)`` and the backbone stride from the model config, if recorded
        (for version-1 rows, which carry no ``input_h``/``input_w``/``stride``)."""
        cfg = self.detr_config() or {}
        try:
            size = (int(cfg["min_size_test"]), int(cfg["max_size_test"]))
        except (KeyError, TypeError, ValueError):
            return None, None
        return size, 16 if int(cfg.get("res5_dilation") or 1) == 2 else 32

    def profile_names_for(self, module: str, layer: int) -> list[str] | None:
        """Names of the ``profile`` entries of a module/layer, if recorded."""
        return self.profile_names.get(f"{module}/{int(layer)}")


def _unknown_keys(model: BaseModel, prefix: str = "") -> list[str]:
    keys = [prefix + k for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys += _unknown_keys(value, f"{prefix}{name}.")
    return keys


def read_manifest(out: str | Path, *, strict: bool = False) -> Manifest | None:
    """``out/manifest.json`` as a :class:`Manifest`; None when there is none. One that cannot be read
    or validated is None too, or raises :class:`ManifestError` with ``strict``."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object, got {type(data).__name__}")
        data.setdefault("version", 1)
        return Manifest.model_validate(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError, ManifestError) as exc:
        if strict:
            msg = str(exc) if isinstance(exc, ManifestError) else f"{path}: {' '.join(str(exc).split())}"
            raise ManifestError(msg) from None
        return None


def write_manifest(out: str | Path, manifest: Manifest | dict[str, Any]) -> Manifest:
    """Validate and write ``out/manifest.json`` atomically; returns the written :class:`Manifest`.

    Refuses keys the model does not know (:class:`ManifestError`): add them to :class:`Manifest` first.
    """
    m = manifest if isinstance(manifest, Manifest) else Manifest.model_validate(manifest)
    unknown = _unknown_keys(m)
    if unknown:
        raise ManifestError(f"manifest: unknown keys {', '.join(sorted(unknown))} (add them to "
                            "lrp_ray.results.Manifest)")
    atomic_write_text(Path(out) / MANIFEST_NAME, json.dumps(m.model_dump(mode="json"), indent=2) + "\n")
    return m
