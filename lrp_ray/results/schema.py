"""The row format: one row per image x target of a (module, layer) relevance call.

:data:`SCHEMA` is the layout of a part file of ``OUT/relevance`` (``module`` and ``layer`` come from the
hive folder names ``module=<m>/layer=<l>``); :data:`FRAME_SCHEMA` adds them in front and is the layout
of every frame the package hands out (:func:`lrp_ray.results.load`, :func:`lrp_ray.api.explain`,
``RelevanceResult.to_frame``). :func:`table_to_frame` is the one Arrow -> pandas conversion, so frames
from either source have the same columns and dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = ["SCHEMA_VERSION", "Column", "COLUMNS", "SCHEMA", "PARTITION_SCHEMA", "FRAME_SCHEMA",
           "FRAME_COLUMNS", "CONSERVATION_PARTS", "backbone_stride", "result_to_table", "table_to_frame",
           "result_frame", "empty_frame"]

SCHEMA_VERSION = 2
"""Version of the output format (rows and manifest). 1: before geometry (``input_h``, ``input_w``,
``stride``) and the ``pos_relevance``/``softmax_relevance`` columns; manifests without ``version``."""


class Column(NamedTuple):
    """One column of a part file: name, Arrow type, whether it may be null, what it holds."""

    name: str
    type: pa.DataType
    nullable: bool
    doc: str


COLUMNS: tuple[Column, ...] = (
    Column("image", pa.string(), False, "image name (relative to the images root; a path or "
                                        "'array_<k>' in notebooks)"),
    Column("image_h", pa.int32(), True, "original image height (after EXIF orientation)"),
    Column("image_w", pa.int32(), True, "original image width"),
    Column("input_h", pa.int32(), True, "height of the resized model input (before batch padding)"),
    Column("input_w", pa.int32(), True, "width of the resized model input"),
    Column("grid_h", pa.int32(), False, "rows of this image's valid token grid"),
    Column("grid_w", pa.int32(), False, "columns of this image's valid token grid"),
    Column("stride", pa.int32(), True, "backbone stride: input pixels per token (16 for DC5, else 32)"),
    Column("feature", pa.int32(), False, "hidden feature (channel) whose relevance was propagated"),
    Column("query", pa.int32(), True, "decoder object query; null for encoder targets"),
    Column("act_sum", pa.float64(), False, "activation of the target (encoder: summed over tokens)"),
    Column("act_max", pa.float64(), False, "max activation over tokens (decoder: the activation)"),
    Column("act_mean", pa.float64(), False, "mean activation over tokens (decoder: the activation)"),
    Column("relevance_total", pa.float64(), False, "relevance at the target"),
    Column("input_relevance", pa.float64(), False, "relevance reaching the encoder input tokens"),
    Column("bias_relevance", pa.float64(), False, "relevance absorbed by biases"),
    Column("pos_relevance", pa.float64(), True, "relevance absorbed by positional embeddings"),
    Column("softmax_relevance", pa.float64(), True, "relevance not conserved by the softmax rule"),
    Column("token_map", pa.list_(pa.float32()), False, "token relevance, row-major [grid_h * grid_w]"),
    Column("channel_relevance", pa.list_(pa.float32()), False, "relevance per encoder input channel"),
    Column("profile", pa.list_(pa.float64()), False, "relevance after each propagation stage (names "
                                                     "in the manifest's profile_names)"),
    Column("rules", pa.string(), False, "LRP rule set"),
    Column("epsilon", pa.float64(), False, "epsilon of the epsilon rule"),
    Column("precision", pa.string(), False, "compute precision"),
)

SCHEMA = pa.schema([(c.name, c.type) for c in COLUMNS])
"""Columns of a part file (``module`` and ``layer`` come from the folder names)."""

PARTITION_SCHEMA = pa.schema([("module", pa.string()), ("layer", pa.int32())])
"""The hive partition keys of ``OUT/relevance`` (``module=<m>/layer=<l>``)."""

FRAME_SCHEMA = pa.schema([*PARTITION_SCHEMA, *SCHEMA])
"""Columns (and Arrow types) of every results frame, in order."""

FRAME_COLUMNS: tuple[str, ...] = tuple(FRAME_SCHEMA.names)

CONSERVATION_PARTS = ("input_relevance", "bias_relevance", "pos_relevance", "softmax_relevance")
"""``relevance_total`` = the sum of these (exactly for epsilon 0, up to the epsilon terms otherwise)."""

_NULLABLE_INTS = frozenset(c.name for c in COLUMNS if c.nullable and c.type == pa.int32())
_PANDAS_INT = {pa.int32(): pd.Int32Dtype()}


def backbone_stride(cfg: Any) -> int:
    """Input pixels per token of a ``DetrConfig``'s backbone: 16 with a dilated res5 (DC5), else 32."""
    return 16 if int(getattr(cfg, "res5_dilation", 1)) == 2 else 32


def _list_column(blocks: Sequence[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """A list array from 2-D blocks (rows x values), blocks may differ in width."""
    lengths = np.concatenate([np.full(b.shape[0], b.shape[1], dtype=np.int64) for b in blocks])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.ascontiguousarray(b).reshape(-1) for b in blocks])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=dtype))


def _pairs(values: Sequence[Sequence[int]] | None, b: int, what: str) -> np.ndarray | None:
    """``[b, 2]`` int array of (h, w) pairs, or None."""
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.int64)
    if arr.shape != (b, 2):
        raise ValueError(f"{what}: expected {b} (h, w) pairs, got shape {arr.shape}")
    return arr


def _per_row(values: np.ndarray | None, col: int, n: int, rows: int) -> pa.Array:
    if values is None:
        return pa.nulls(rows, pa.int32())
    return pa.array(np.repeat(values[:, col], n).astype(np.int32), pa.int32())


def _scalar(res: Any, name: str, rows: int) -> pa.Array:
    """A float64 column of ``res`` (``[B, N]``), or nulls when ``res`` does not carry it."""
    v = getattr(res, name, None)
    if v is None:
        return pa.nulls(rows, pa.float64())
    return pa.array(np.asarray(v, dtype=np.float64).reshape(-1), pa.float64())


def result_to_table(res: Any, image_names: Sequence[str], image_sizes: Sequence[Sequence[int]] | None,
                    *, stride: int | None = None, input_sizes: Sequence[Sequence[int]] | None = None,
                    cfg: Any = None) -> pa.Table:
    """Rows (image-major, then target) of a ``RelevanceResult`` in the :data:`SCHEMA` layout.

    ``image_sizes``: original (h, w) per image (None: ``image_h``/``image_w`` null). ``cfg``: the model's
    ``DetrConfig``; gives ``stride`` and, with ``image_sizes``, ``input_sizes`` (detectron2's resize).
    Explicit ``stride``/``input_sizes`` win; what stays unknown is null.
    """
    b, n = np.asarray(res.queries).shape
    if len(image_names) != b:
        raise ValueError(f"{len(image_names)} image names for {b} images")
    sizes = _pairs(image_sizes, b, "image_sizes")
    inputs = _pairs(input_sizes, b, "input_sizes")
    if cfg is not None:
        stride = backbone_stride(cfg) if stride is None else stride
        if inputs is None and sizes is not None:
            from lrp_ray.models.preprocess import resize_shape

            inputs = np.asarray([resize_shape(int(h), int(w), int(cfg.min_size_test), int(cfg.max_size_test))
                                 for h, w in sizes], dtype=np.int64)
    valid = np.asarray(res.valid_hw).astype(np.int64).reshape(b, 2)
    maps = np.asarray(res.token_maps)
    token_blocks = [np.asarray(maps[i, :, :valid[i, 0], :valid[i, 1]], dtype=np.float32).reshape(n, -1)
                    for i in range(b)]
    chan = np.asarray(res.channel_relevance, dtype=np.float32).reshape(b * n, -1)
    prof = np.asarray(res.profile, dtype=np.float64).reshape(b * n, -1)
    q = np.asarray(res.queries).reshape(-1).astype(np.int32)
    rows = b * n
    columns = {
        "image": pa.array(np.repeat(np.asarray([str(x) for x in image_names], dtype=object), n), pa.string()),
        "image_h": _per_row(sizes, 0, n, rows),
        "image_w": _per_row(sizes, 1, n, rows),
        "input_h": _per_row(inputs, 0, n, rows),
        "input_w": _per_row(inputs, 1, n, rows),
        "grid_h": _per_row(valid, 0, n, rows),
        "grid_w": _per_row(valid, 1, n, rows),
        "stride": pa.nulls(rows, pa.int32()) if stride is None else pa.array(np.full(rows, int(stride),
                                                                                      np.int32)),
        "feature": pa.array(np.tile(np.asarray(res.features, dtype=np.int32), b), pa.int32()),
        "query": pa.array(q, pa.int32(), mask=q < 0),
        **{name: _scalar(res, name, rows) for name in ("act_sum", "act_max", "act_mean")},
        "relevance_total": _scalar(res, "target_relevance", rows),
        **{name: _scalar(res, name, rows) for name in CONSERVATION_PARTS},
        "token_map": _list_column(token_blocks, pa.float32()),
        "channel_relevance": _list_column([chan], pa.float32()),
        "profile": _list_column([prof], pa.float64()),
        "rules": pa.array([str(res.rules)] * rows, pa.string()),
        "epsilon": pa.array(np.full(rows, float(res.epsilon))),
        "precision": pa.array([str(res.precision)] * rows, pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """The frame of an Arrow table of results rows: :data:`FRAME_COLUMNS` that the table has, in order.

    Integer columns that may be null (``query``, ``image_h``, ``stride``, ...) become pandas ``Int32``, the
    others ``int32``; floats ``float64`` (null: NaN); list columns hold numpy arrays.
    """
    names = [c for c in FRAME_COLUMNS if c in table.column_names]
    extra = [c for c in table.column_names if c not in FRAME_SCHEMA.names]
    table = table.select(names + extra)
    cast = pa.schema([FRAME_SCHEMA.field(c) for c in names] + [table.schema.field(c) for c in extra])
    df = table.cast(cast).to_pandas(types_mapper=_PANDAS_INT.get)
    for c in names:
        if FRAME_SCHEMA.field(c).type == pa.int32() and c not in _NULLABLE_INTS:
            df[c] = df[c].astype(np.int32)
    return df


def empty_frame(columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A frame with no rows and the results columns (all, or ``columns``) and dtypes."""
    names = list(FRAME_COLUMNS if columns is None else columns)
    return table_to_frame(pa.schema([FRAME_SCHEMA.field(c) for c in names]).empty_table())


def result_frame(res: Any, image_names: Sequence[str] | None = None,
                 image_sizes: Sequence[Sequence[int]] | None = None, **geometry: Any) -> pd.DataFrame:
    """A ``RelevanceResult`` as a results frame (the columns of :func:`lrp_ray.results.load`).

    ``image_names`` default to ``"0"``, ``"1"``, ...; ``geometry``: ``stride``, ``input_sizes``, ``cfg``
    as for :func:`result_to_table`.
    """
    b = int(np.asarray(res.queries).shape[0])
    names = [str(i) for i in range(b)] if image_names is None else list(image_names)
    table = result_to_table(res, names, image_sizes, **geometry)
    rows = table.num_rows
    table = table.add_column(0, PARTITION_SCHEMA.field("layer"),
                             pa.array(np.full(rows, int(res.layer), np.int32), pa.int32()))
    table = table.add_column(0, PARTITION_SCHEMA.field("module"),
                             pa.array([str(res.module)] * rows, pa.string()))
    return table_to_frame(table)
