"""detectron2-style YAML configuration for DETR.

Reads the ``config.yaml`` that a detectron2 training run writes (``cfg.dump()``), honours ``_BASE_``
inheritance and command-line style overrides, and keeps only what the DETR model needs in a
:class:`DetrConfig`. Files are parsed with ``yaml.safe_load``: Python object tags are refused.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..safe_yaml import load_mapping

__all__ = ["ConfigError", "DetrConfig", "load_config", "FIELD_KEYS", "KEY_FIELDS"]


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


# DetrConfig field -> detectron2 config key.
FIELD_KEYS: dict[str, str] = {
    "meta_architecture": "MODEL.META_ARCHITECTURE",
    "hidden_dim": "MODEL.DETR.HIDDEN_DIM",
    "nheads": "MODEL.DETR.NHEADS",
    "enc_layers": "MODEL.DETR.ENC_LAYERS",
    "dec_layers": "MODEL.DETR.DEC_LAYERS",
    "dim_feedforward": "MODEL.DETR.DIM_FEEDFORWARD",
    "dropout": "MODEL.DETR.DROPOUT",
    "pre_norm": "MODEL.DETR.PRE_NORM",
    "num_queries": "MODEL.DETR.NUM_OBJECT_QUERIES",
    "num_classes": "MODEL.DETR.NUM_CLASSES",
    "resnet_depth": "MODEL.RESNETS.DEPTH",
    "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
    "res5_dilation": "MODEL.RESNETS.RES5_DILATION",
    "stem_out_channels": "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "res2_out_channels": "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "width_per_group": "MODEL.RESNETS.WIDTH_PER_GROUP",
    "num_groups": "MODEL.RESNETS.NUM_GROUPS",
    "pixel_mean": "MODEL.PIXEL_MEAN",
    "pixel_std": "MODEL.PIXEL_STD",
    "input_format": "INPUT.FORMAT",
    "min_size_test": "INPUT.MIN_SIZE_TEST",
    "max_size_test": "INPUT.MAX_SIZE_TEST",
}
KEY_FIELDS: dict[str, str] = {v: k for k, v in FIELD_KEYS.items()}

_DEPTHS = (18, 34, 50, 101, 152)
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class DetrConfig(BaseModel):
    """What the DETR model and its preprocessing need, with DETR's defaults (DETR-R50, COCO).

    Build one with :func:`load_config`; field ``x`` comes from the detectron2 key ``FIELD_KEYS["x"]``.
    ``width_per_group`` and ``num_groups`` give the bottleneck width of ResNet-50+ (detectron2's
    ``WIDTH_PER_GROUP * NUM_GROUPS``).
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    meta_architecture: str = "Detr"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    num_classes: int = 80
    resnet_depth: int = 50
    stride_in_1x1: bool = False
    res5_dilation: int = 1
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    width_per_group: int = 64
    num_groups: int = 1
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    input_format: Literal["RGB", "BGR"] = "RGB"
    min_size_test: int = 800
    max_size_test: int = 1333

    @model_validator(mode="before")
    @classmethod
    def _narrow_resnet_default(cls, data: Any) -> Any:
        # detectron2 forces RES2_OUT_CHANNELS 64 for the BasicBlock ResNets; keep that as the default.
        basic = isinstance(data, dict) and data.get("resnet_depth") in (18, 34)
        if basic and "res2_out_channels" not in data:
            data = {**data, "res2_out_channels": 64}
        return data

    @field_validator("pixel_mean", "pixel_std", mode="before")
    @classmethod
    def _three_values(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, (list, tuple)):
            if len(v) != 3:
                raise ValueError(f"{FIELD_KEYS[str(info.field_name)]} must have 3 values (one per channel), "
                                 f"got {list(v)}")
            return tuple(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> DetrConfig:
        if self.meta_architecture != "Detr":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE is {self.meta_architecture!r}; only DETR's detectron2 wrapper "
                "('Detr') is supported")
        positive = ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                    "num_classes", "stem_out_channels", "res2_out_channels", "width_per_group",
                    "num_groups", "max_size_test")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{FIELD_KEYS[name]} must be positive, got {getattr(self, name)}")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM ({self.hidden_dim}) must be divisible by "
                             f"MODEL.DETR.NHEADS ({self.nheads})")
        if self.hidden_dim % 2:
            raise ValueError("MODEL.DETR.HIDDEN_DIM must be even (sine position encoding), "
                             f"got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MODEL.DETR.DROPOUT must be in [0, 1), got {self.dropout}")
        if self.resnet_depth not in _DEPTHS:
            raise ValueError(f"MODEL.RESNETS.DEPTH must be one of {_DEPTHS}, got {self.resnet_depth}")
        if self.res5_dilation not in (1, 2):
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {self.res5_dilation}")
        if self.res5_dilation == 2 and self.resnet_depth < 50:
            raise ValueError("MODEL.RESNETS.RES5_DILATION 2 needs a bottleneck ResNet (DEPTH >= 50), "
                             f"got DEPTH {self.resnet_depth}")
        if self.min_size_test < 0:
            raise ValueError("INPUT.MIN_SIZE_TEST must be >= 0 (0 disables resizing), "
                             f"got {self.min_size_test}")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"MODEL.PIXEL_STD must be positive, got {list(self.pixel_std)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Nested detectron2-style dict of this config (what :meth:`to_yaml` writes)."""
        out: dict[str, Any] = {}
        for name, key in FIELD_KEYS.items():
            value = getattr(self, name)
            _set_key(out, key, list(value) if isinstance(value, tuple) else value)
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Detectron2-style YAML text (written to ``path`` when given) that :func:`load_config` reads."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str]) -> DetrConfig:
        """A copy with detectron2-key overrides applied (mapping or flat list as in :func:`load_config`)."""
        tree = self.to_dict()
        pairs = overrides.items() if isinstance(overrides, Mapping) else _parse_overrides(overrides)
        for key, value in pairs:
            _set_key(tree, _override_key(key, tree), value)
        return _from_tree(tree, "overrides")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DetrConfig:
    """Load a detectron2 YAML config (``None``: DETR-R50 defaults) and apply overrides.

    ``overrides`` is a flat list as detectron2's ``opts``: ``["MODEL.DETR.ENC_LAYERS", "3", ...]``, or
    ``"KEY=VALUE"`` / ``"KEY VALUE"`` strings; values are parsed with ``yaml.safe_load``. Keys may also be
    :class:`DetrConfig` field names. Unknown override keys are an error (typo protection).
    """
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a sequence of strings, not one string")
    tree: dict[str, Any] = {} if path is None else _load_tree(Path(path), ())
    source = "defaults" if path is None else str(path)
    given: dict[str, Any] = {}
    for key, value in _parse_overrides(overrides):
        full = _override_key(key, tree)
        _set_key(tree, full, value)
        given[full] = value
    return _from_tree(tree, source, given)


CHECKED_SECTIONS = ("MODEL", "MODEL.DETR", "MODEL.RESNETS", "INPUT")
"""Sections whose keys are checked against detectron2's (a typo there would silently change the model)."""


@functools.lru_cache(maxsize=1)
def _known_keys() -> frozenset[str]:
    text = (Path(__file__).resolve().parents[1] / "assets" / "detectron2_keys.txt").read_text()
    listed = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    return frozenset(listed | set(KEY_FIELDS))


def _check_keys(tree: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Refuse unknown keys in :data:`CHECKED_SECTIONS`, naming the closest valid one (as detectron2 does)."""
    known = _known_keys()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if prefix[:-1] in CHECKED_SECTIONS and path not in known:
            siblings = [k for k in known if k.rsplit(".", 1)[0] == prefix[:-1]]
            close = difflib.get_close_matches(path, siblings, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {path}{hint}")
        if isinstance(value, Mapping) and path in CHECKED_SECTIONS:
            _check_keys(value, source, f"{path}.")


def _from_tree(tree: Mapping[str, Any], source: str,
               overridden: Mapping[str, Any] | None = None) -> DetrConfig:
    """The config of a merged tree; an invalid value names where it came from (``--opt`` or the file)."""
    overridden = overridden or {}
    values: dict[str, Any] = {}
    for name, key in FIELD_KEYS.items():
        found, value = _get_key(tree, key)
        if found:
            values[name] = value
    try:
        return DetrConfig(**values)
    except ValidationError as exc:
        lines, from_opt = [], False
        for err in exc.errors():
            loc = err.get("loc", ())
            field = str(loc[0]) if loc else ""
            key = FIELD_KEYS.get(field, field)
            msg = err.get("msg", "")
            from_opt = from_opt or key in overridden
            if err.get("type") == "value_error":
                msg = msg.removeprefix("Value error, ")
                lines.append(msg)
            else:
                got = values.get(field, err.get("input"))
                where = f"--opt {key}={overridden[key]!r}" if key in overridden else key
                lines.append(f"{where}: {msg} (got {got!r})")
        origin = "invalid override" if from_opt and len(lines) == 1 else f"invalid config ({source})"
        raise ConfigError(f"{origin}: " + "; ".join(lines)) from None


def _load_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        where = f" (_BASE_ of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError("circular _BASE_ chain: " + " -> ".join(str(p) for p in (*chain, resolved)))
    data = load_mapping(path, str(path), ConfigError)
    _check_keys(data, str(path))  # per file: the error names the file that holds the key
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: _BASE_ must be a file path string, got {base!r}")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    merged = _load_tree(base_path, (*chain, resolved))
    _merge(merged, data)
    return merged


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _get_key(tree: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    items = list(items)
    i = 0
    while i < len(items):
        item = items[i]
        if not isinstance(item, str):
            raise ConfigError(f"override keys must be strings, got {item!r}")
        m = re.match(r"^([A-Za-z][A-Za-z0-9_.]*)\s*(?:=|\s)\s*(.*)$", item.strip(), re.S)
        if m and _KEY_RE.match(m.group(1)):
            out.append((m.group(1), _parse_value(m.group(2))))
            i += 1
            continue
        if not _KEY_RE.match(item):
            raise ConfigError(f"bad override key {item!r}: expected KEY VALUE pairs such as "
                              "['MODEL.DETR.ENC_LAYERS', '3'] or 'KEY=VALUE'")
        if i + 1 >= len(items):
            raise ConfigError(f"override {item!r} has no value")
        out.append((item, _parse_value(items[i + 1])))
        i += 2
    return out


def _override_key(key: str, tree: Mapping[str, Any]) -> str:
    if key in FIELD_KEYS:
        return FIELD_KEYS[key]
    if key in KEY_FIELDS or _get_key(tree, key)[0]:
        return key
    close = difflib.get_close_matches(key, list(KEY_FIELDS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown config key {key!r} in overrides{hint}")
