"""The sweep request: :class:`SweepSpec` (pydantic), YAML job files, CLI flag merge and the spec hash.

A spec says *what* to compute (model, images, module/layers/features/queries, rules) and *how* to run it
(actors, device, address, output). Only the first part decides the results; :func:`result_key` picks it
out for the spec hash that guards resuming into an existing output folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "BadRequest", "SweepSpec", "load_spec", "merge_flags", "parse_index_list", "resolve_indices",
    "parse_queries", "format_indices", "spec_hash", "RESULT_FIELDS", "DEFAULT_ITEM_FEATURES",
]

DEFAULT_ITEM_FEATURES = 128
"""Features per work item when ``feature_chunk`` is ``auto`` (the engine may split an item further).
Enough targets per call (hidden_dim/4 on CPU, /2 on GPUs) let the engine use its per-token maps."""


class BadRequest(ValueError):
    """A request that cannot run (exit code 2): one line naming the problem and what is valid."""


IndexSpec = str | int | list[int]


class SweepSpec(BaseModel):
    """Everything a sweep needs; YAML job files hold the same keys (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    description: str = Field("", description="free text, for job files; ignored")
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
    batch_size: int = Field(4, ge=1, description="images per forward pass")
    feature_chunk: int | Literal["auto"] = Field(
        "auto", description=f"features per work item; 'auto': {DEFAULT_ITEM_FEATURES} per item, split "
                            "further to fit memory")
    # --- how to run
    out: str = Field("lrp_out", description="output folder")
    actors: int | Literal["auto"] = Field("auto", description="worker actors; 'auto': one per GPU (or per "
                                                              "cpus_per_actor CPUs)")
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per actor when running on CUDA")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs (torch threads) per actor")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device of the actors")
    compile: bool = Field(False, description="torch.compile the relevance kernels")
    address: str | None = Field(None, description="Ray address: 'local' (a fresh instance on 127.0.0.1), "
                                                  "'auto', 'ray://host:10001'; default: $RAY_ADDRESS or "
                                                  "local")
    resume: bool = Field(True, description="skip work already in OUT (same spec only)")
    overwrite: bool = Field(False, description="delete earlier results in OUT first")
    heatmaps: bool = Field(False, description="also render OUT/heatmaps/*.png")
    cache_budget_mb: int = Field(2048, ge=1, description="MiB of forward caches an actor keeps live (on its "
                                                        "device); at least one batch's")
    max_in_flight: int = Field(2, ge=1, description="work items queued per actor")
    max_item_retries: int = Field(3, ge=1, description="attempts per work item on errors")
    ping_timeout_s: float = Field(60.0, gt=0, description="seconds an actor may not answer before its "
                                                          "work moves elsewhere")

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

    @field_validator("feature_chunk", "actors")
    @classmethod
    def _positive(cls, v: Any, info: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'auto', got {v}")
        return v

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("out must not be empty")
        return v

    @property
    def modules(self) -> list[str]:
        return ["encoder", "decoder"] if self.module == "both" else [self.module]


RESULT_FIELDS = ("module", "layers", "features", "queries", "rules", "epsilon", "precision", "batch_size",
                 "feature_chunk")
"""Spec fields that decide the row set or values (together with the model and the image set)."""

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_index_list(value: Any, what: str = "indices") -> list[int] | None:
    """``'all'`` -> None; ``'0-5'``, ``'0,3,5'``, ``'1-3,7'``, ``5``, ``[0, 3]`` -> sorted unique ints."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected 'all', 'a-b', 'a,b,c' or a list of integers, got {value!r}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return None
        out: list[int] = []
        for part in text.split(","):
            part = part.strip()
            m = _RANGE.match(part)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError(f"{what}: range {part!r} runs backwards")
                out.extend(range(a, b + 1))
            elif part.isdigit():
                out.append(int(part))
            else:
                raise ValueError(f"{what}: cannot read {value!r}; expected 'all', 'a-b', 'a,b,c' "
                                 "(non-negative integers)")
        value = out
    if isinstance(value, (list, tuple)):
        ints = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what}: expected non-negative integers, got {v!r}")
            ints.append(v)
        if not ints:
            raise ValueError(f"{what}: empty list")
        return sorted(set(ints))
    raise ValueError(f"{what}: expected 'all', 'a-b', 'a,b,c' or a list of integers, got {value!r}")


def resolve_indices(value: Any, n: int, what: str) -> list[int]:
    """Indices of ``value`` checked against ``0..n-1``; :class:`BadRequest` when out of range."""
    try:
        idx = parse_index_list(value, what)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if idx is None:
        return list(range(n))
    bad = [i for i in idx if i >= n]
    if bad:
        raise BadRequest(f"{what} {format_indices(bad)} out of range: this model has {n} ({what} 0-{n - 1})")
    return idx


def parse_queries(value: Any) -> str | list[int]:
    """``'all'``, ``'topK'`` or a list of query ids (``'0,3'`` accepted)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all" or re.fullmatch(r"top[1-9]\d*", text):
            return text
        try:
            ids = parse_index_list(text, "queries")
        except ValueError:
            raise ValueError(f"queries: expected 'all', 'topK' (e.g. 'top5') or ids like '0,3', "
                             f"got {value!r}") from None
        if ids is None:
            return "all"
        return ids
    ids = parse_index_list(value, "queries")
    return "all" if ids is None else ids


def check_queries(value: Any, num_queries: int) -> str | list[int]:
    """Queries checked against the model's number of object queries (:class:`BadRequest` if not)."""
    q = parse_queries(value)
    if isinstance(q, str) and q.startswith("top"):
        k = int(q[3:])
        if k > num_queries:
            raise BadRequest(f"queries {q}: this model has {num_queries} object queries "
                             f"(top1-top{num_queries})")
    elif isinstance(q, list):
        bad = [i for i in q if i >= num_queries]
        if bad:
            raise BadRequest(f"queries {format_indices(bad)} out of range: this model has {num_queries} "
                             f"object queries (0-{num_queries - 1})")
    return q


def format_indices(idx: Sequence[int]) -> str:
    """Compact text of sorted indices: ``[0,1,2,3,7]`` -> ``'0-3,7'``."""
    idx = list(idx)
    if not idx:
        return ""
    parts = []
    start = prev = idx[0]
    for i in idx[1:]:
        if i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


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
        key = str(err.get("loc", ("?",))[0])
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
        raise BadRequest(f"--spec {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.constructor.ConstructorError as exc:  # e.g. !!python/object: never constructed
        tag = f" {exc.problem.split('tag', 1)[-1].strip()}" if exc.problem and "tag" in exc.problem else ""
        raise BadRequest(f"--spec {path}: refused a YAML tag{tag}; job files are read with a safe loader "
                         "(plain keys and values only)") from None
    except yaml.YAMLError as exc:
        raise BadRequest(f"--spec {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest(f"--spec {path}: top level must be a mapping of spec keys, "
                         f"got {type(data).__name__}")
    # relative model / image paths in a job file are relative to the working directory (as on the command
    # line), so that `ray job submit --working-dir .` and a local run behave the same
    build_spec(data, f"--spec {path}")
    return data


def merge_flags(spec_data: Mapping[str, Any], flags: Mapping[str, Any]) -> SweepSpec:
    """Flags that were given (not None) override the spec file's keys."""
    merged = dict(spec_data)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return build_spec(merged, "request")


def spec_hash(result_key: Mapping[str, Any]) -> str:
    """Stable hash of what decides the results (see :data:`RESULT_FIELDS`)."""
    text = json.dumps(result_key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
