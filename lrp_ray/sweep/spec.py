"""The sweep request, split by what it decides.

- :class:`ResultRequest`: what to compute (model, images, module/layers/features/queries, rules,
  precision, batching). Once resolved against the model and the images it becomes a :class:`ResultSpec`,
  which holds everything that can change a number or the row set and is hashed wholesale: resuming into
  an existing OUT compares that hash only.
- :class:`RunSpec`: how to run it (Ray address, actors, device, budgets, retries, output folder). Nothing
  in it may change a result.
- :class:`SweepSpec`: both, flat, as YAML job files and CLI flags give them (unknown keys are refused).

Which side a key is on is decided by the class that declares it; there is no separate list of keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..safe_yaml import load_mapping
from .indices import (
    BadRequest,
    check_queries,
    format_indices,
    parse_detection_pairs,
    parse_index_list,
    parse_queries,
    resolve_indices,
)

__all__ = [
    "BadRequest", "ResultRequest", "RunSpec", "SweepSpec", "ResultSpec", "load_spec", "merge_flags",
    "parse_index_list", "resolve_indices", "parse_queries", "check_queries", "format_indices",
    "DEFAULT_ITEM_FEATURES",
]

DEFAULT_ITEM_FEATURES = 128
"""Features per work item when ``feature_chunk`` is ``auto``. Enough targets per call (hidden_dim/4) let
the engine use its per-token maps. The item size is part of the request: it decides how the engine
splits its work, and so the last digits of the numbers."""

IndexSpec = str | int | list[int]


def _positive_or_auto(v: Any) -> Any:
    if isinstance(v, int) and v < 1:
        raise ValueError(f"must be >= 1 or 'auto', got {v}")
    return v


class ResultRequest(BaseModel):
    """What to compute: every key here can change the numbers or the rows of a sweep."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model
    config: str | None = Field(None, description="detectron2 config.yaml of the model "
                                                 "(default: bundled demo)")
    weights: str | None = Field(None, description="checkpoint .pth (default: bundled demo / random seed 0)")
    overrides: list[str] = Field(default_factory=list,
                                 description="config overrides, 'KEY=VALUE' (detectron2 keys)")
    # --- what to explain
    images: str | None = Field(None, description="folder (searched recursively) or glob of images "
                                                 "(default: bundled demo images)")
    module: Literal["encoder", "decoder", "both"] = Field("both", description="transformer module(s)")
    layers: IndexSpec = Field("all", description="layer indices: 'all', '0-5', '0,3,5'")
    features: IndexSpec = Field("all", description="feature (channel) indices: 'all', '0-255', '233,100'")
    queries: str | list[int] = Field("top1", description="decoder queries per image: 'all', 'topK' "
                                                         "(highest detection score), or ids '0,3'")
    rules: Literal["cp", "attnlrp"] = Field("cp", description="LRP rule set")
    epsilon: float = Field(1e-6, gt=0, description="epsilon of the epsilon rule")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="compute precision")
    batch_size: int = Field(4, ge=1, description="images per forward pass (DETR pads a batch to its "
                                                 "largest image: batch size and order are part of the "
                                                 "result)")
    feature_chunk: int | Literal["auto"] = Field(
        "auto", description=f"features per work item; 'auto': {DEFAULT_ITEM_FEATURES} per item")
    # --- detection targets (concept relevance of detections)
    target: Literal["features", "detections", "both"] = Field(
        "features", description="what relevance starts from: the swept features of each layer, the "
                                "detections' class logits (concepts at each layer + conditional maps), "
                                "or both")
    detections: str | list[tuple[int, int]] = Field(
        "top5", description="detections to explain per image: 'topK' (by score), 'score>=X', 'class=C' "
                            "(id, or a name from class_names), or (query, class_id) pairs 'q:c,q:c'")
    top_concepts: int = Field(5, ge=0, description="conditional heatmaps per detection and layer (its most "
                                                   "relevant channels)")
    class_names: str | list[str] | None = Field(
        None, description="class names, index = class id: a text file (one per line) or a list "
                          "(default: the bundled demo's names for the demo model)")
    faithfulness: bool = Field(False, description="deletion curves and pointing game per detection")
    # --- pixel maps (LRP continued through input_proj and the backbone)
    pixels: str | None = Field(None, description="after the token sweep, pixel maps for each feature's "
                                                 "reference rows: 'topN' by activation and by relevance")
    pixel_composite: str = Field("EpsilonPlusFlat", description="zennit composite of the backbone "
                                                                "(EpsilonPlusFlat, EpsilonGammaBox, "
                                                                "EpsilonAlpha2Beta1Flat, EpsilonFlat)")
    pixel_max_side: int = Field(256, ge=1, description="pixel maps are block-summed to at most this side")

    @field_validator("layers", "features")
    @classmethod
    def _index_spec(cls, v: Any, info: Any) -> Any:
        parse_index_list(v, info.field_name)  # syntax only; ranges are checked against the model
        return v

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: Any) -> Any:
        parse_queries(v)
        return v

    _chunk = field_validator("feature_chunk")(classmethod(lambda cls, v: _positive_or_auto(v)))

    @model_validator(mode="after")
    def _options_need_their_target(self) -> ResultRequest:
        given = self.model_fields_set
        det = sorted(given & {"detections", "top_concepts", "class_names", "faithfulness"})
        if det and not self.detection_targets:
            raise ValueError(f"{', '.join(det)}: only for detection targets; add target: detections or "
                             "both (--target)")
        px = sorted(given & {"pixel_composite", "pixel_max_side"})
        if px and self.pixels is None:
            raise ValueError(f"{', '.join(px)}: only for pixel maps; add pixels: topN (--pixels)")
        return self

    @field_validator("detections", mode="before")
    @classmethod
    def _detections(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):  # YAML 1.1 reads 12:2 as a base-60 number
            raise ValueError("detections: quote query:class pairs in YAML, e.g. detections: '12:2'")
        if isinstance(v, str) and ":" in v and not v.strip().lower().startswith("class"):
            return parse_detection_pairs(v)
        return v

    @field_validator("pixels")
    @classmethod
    def _pixels(cls, v: Any) -> Any:
        from lrp_ray.queries import top_k

        if v is not None and top_k(v) is None:
            raise ValueError(f"expected 'topN' (e.g. 'top8'), got {v!r}")
        return v

    @property
    def feature_targets(self) -> bool:
        return self.target in ("features", "both")

    @property
    def detection_targets(self) -> bool:
        return self.target in ("detections", "both")

    @property
    def modules(self) -> list[str]:
        return ["encoder", "decoder"] if self.module == "both" else [self.module]

    @property
    def item_features(self) -> int:
        return DEFAULT_ITEM_FEATURES if self.feature_chunk == "auto" else int(self.feature_chunk)


class RunSpec(BaseModel):
    """How to run a request: none of these keys may change a result (only speed, memory, resilience)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    description: str = Field("", description="free text, for job files; ignored")
    out: str = Field("lrp_out", description="output folder")
    actors: int | Literal["auto"] = Field("auto", description="worker actors; 'auto': one per GPU (or per "
                                                              "cpus_per_actor CPUs)")
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per actor when running on CUDA")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs (torch threads) per actor")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device of the actors "
                                                                       "(CPU and CUDA agree to ~1e-6, not "
                                                                       "bitwise)")
    compile: bool = Field(False, description="torch.compile the relevance kernels")
    address: str | None = Field(None, description="Ray address: 'local' (a fresh instance on 127.0.0.1), "
                                                  "'auto', 'ray://host:10001'; default: $RAY_ADDRESS or "
                                                  "local")
    resume: bool = Field(True, description="skip work already in OUT (same request only)")
    overwrite: bool = Field(False, description="delete earlier results in OUT first")
    heatmaps: bool = Field(False, description="also render OUT/heatmaps/*.png")
    cache_budget_mb: int = Field(2048, ge=1, description="MiB of forward caches an actor keeps live (on its "
                                                        "device); at least one batch's")
    max_in_flight: int = Field(2, ge=1, description="work items queued per actor")
    max_item_retries: int = Field(3, ge=1, description="attempts per work item on errors")
    max_system_retries: int = Field(10, ge=1, description="attempts per work item when its worker dies, "
                                                          "is lost or runs out of memory")
    ping_timeout_s: float = Field(60.0, gt=0, description="seconds an actor may not answer before its "
                                                          "work moves elsewhere")
    start_timeout_s: float = Field(600.0, gt=0, description="seconds the actors may take to start (model "
                                                            "shipping, a GPU node booting) before the sweep "
                                                            "stops, naming the resources it waited for")

    _actors = field_validator("actors")(classmethod(lambda cls, v: _positive_or_auto(v)))

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("out must not be empty")
        return v


class SweepSpec(ResultRequest, RunSpec):
    """A whole request, flat (YAML job files and CLI flags hold the same keys)."""

    def result_request(self) -> ResultRequest:
        return ResultRequest(**{k: getattr(self, k) for k in ResultRequest.model_fields})

    def run_spec(self) -> RunSpec:
        return RunSpec(**{k: getattr(self, k) for k in RunSpec.model_fields})


class ResultSpec(BaseModel):
    """A request resolved against its model and images: everything that can change a number or the row
    set. Two sweeps with the same :meth:`digest` write the same rows with bitwise equal values (on the same
    device type and library build); resuming compares the digest only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int
    model: dict[str, Any] = Field(description="the model config as loaded (architecture, preprocessing)")
    weights_sha256: str | None = Field(description="digest of the weights as loaded")
    numerics: dict[str, Any] = Field(description="the engine's constants that decide its arithmetic")
    images: list[tuple[str, str]] = Field(description="(name, content digest) of every usable image, in "
                                                      "batch order")
    batch_size: int
    layers: dict[str, list[int]]
    features: str
    queries: str | list[int] | None
    item_features: int
    rules: str
    epsilon: float
    precision: str
    detections: dict[str, Any] | None = Field(
        None, description="detection targets: selection, top_concepts, class_names, faithfulness; None "
                          "for a features-only request")
    pixels: dict[str, Any] | None = Field(
        None, description="pixel maps: top (reference rows per feature), composite identity, max_side")

    def digest(self) -> str:
        """Stable hash of the whole spec (16 hex digits); a request without detection targets or pixel
        maps hashes as before they existed."""
        skip = {k for k in ("detections", "pixels") if getattr(self, k) is None}
        return hashlib.sha256(self.model_dump_json(exclude=skip).encode()).hexdigest()[:16]

    def differences(self, other: Mapping[str, Any] | None) -> list[str]:
        """Keys whose values differ from ``other`` (an earlier spec's JSON form)."""
        if not other:
            return ["(an earlier format)"]
        mine = self.model_dump(mode="json")
        return sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))


_UNION_HINTS = {
    "layers": "expected 'all', 'a-b', 'a,b,c' or a list of non-negative integers",
    "features": "expected 'all', 'a-b', 'a,b,c' or a list of non-negative integers",
    "queries": "expected 'all', 'topK' (e.g. 'top5') or a list of query ids",
    "feature_chunk": "expected an integer >= 1 or 'auto'",
    "actors": "expected an integer >= 1 or 'auto'",
}


def _validation_message(exc: ValidationError, source: str) -> str:
    msgs = []
    for err in exc.errors():
        loc = err.get("loc")
        if not loc:  # the request as a whole (options that need another option)
            msgs.append(err.get("msg", "").removeprefix("Value error, "))
            continue
        key = str(loc[0])
        kind = err.get("type")
        msg = err.get("msg", "").removeprefix("Value error, ").removeprefix(f"{key}: ")
        if kind == "extra_forbidden":
            valid = ", ".join(SweepSpec.model_fields)
            msg = f"unknown key (valid keys: {valid})"
        elif kind == "literal_error":
            msg = msg.replace("Input should be", "must be")
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
                  "less_than": "<"}[kind]
            bound = next(iter((err.get("ctx") or {}).values()), "?")
            msg = f"must be {op} {bound}, got {err.get('input')!r}"
        elif key in _UNION_HINTS and kind != "value_error":  # a type error of one member of a union
            msg = _UNION_HINTS[key]
        # union types repeat one error per member; keep the key's first message only
        if not any(m.startswith(f"{key}:") for m in msgs):
            msgs.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(msgs)


def build_spec(data: Mapping[str, Any], source: str = "spec") -> SweepSpec:
    try:
        return SweepSpec(**dict(data))
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc, source)) from None


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a YAML job file into a dict of spec keys (validated later, merged with flags)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadRequest(f"--spec {path}: {'is a folder, not a file' if p.is_dir() else 'file not found'}")
    data = load_mapping(p, f"--spec {path}", BadRequest, "a mapping of spec keys")
    # relative model / image paths in a job file are relative to the working directory (as on the command
    # line), so that `ray job submit --working-dir .` and a local run behave the same
    build_spec(data, f"--spec {path}")
    return data


def merge_flags(spec_data: Mapping[str, Any], flags: Mapping[str, Any]) -> SweepSpec:
    """Flags that were given (not None) override the spec file's keys."""
    merged = dict(spec_data)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return build_spec(merged, "request")
