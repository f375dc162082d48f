"""The output format of detection targets: explained detections, their concepts and concept maps.

A sweep with detection targets writes four flat Parquet datasets next to ``relevance/`` (one part per image
batch, named like feature parts with the request's digest):

- ``detections/``: one row per explained detection (:data:`DETECTION_SCHEMA`);
- ``concepts/``: one row per detection x (module, layer) x channel (:data:`CONCEPT_SCHEMA`);
- ``concept_maps/``: the token map of a detection conditioned on one of its top channels at one layer
  (:data:`CONCEPT_MAP_SCHEMA`);
- ``faithfulness/``: deletion curves and the pointing game per detection (:data:`FAITHFULNESS_SCHEMA`),
  when the request asked for them;

and ``concepts_by_class.csv`` (:func:`concepts_by_class`, written after the run). :func:`detection_tables`
is the one conversion of a batch's arrays to rows; :func:`lrp_ray.api.explain_detections` returns frames of
the same tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import Column, backbone_stride

__all__ = [
    "DETECTION_SCHEMA", "CONCEPT_SCHEMA", "CONCEPT_MAP_SCHEMA", "FAITHFULNESS_SCHEMA", "BY_CLASS_COLUMNS",
    "DETECTION_DATASETS", "BY_CLASS_NAME", "BY_CLASS_PARQUET", "detection_tables", "tables_to_frames",
    "concepts_by_class",
    "load_detections", "load_concepts", "load_concept_maps", "read_concepts_by_class", "read_faithfulness",
    "detection_dataset_files", "no_detection_images", "class_name",
]

_KEY = (
    Column("image", pa.string(), False, "image name (relative to the images root)"),
    Column("query", pa.int32(), False, "object query of the detection"),
    Column("class_id", pa.int32(), False, "explained class (the predicted one unless pairs were given)"),
    Column("class_name", pa.string(), True, "the class's name, when the request has class names"),
)
_GRID = (
    Column("grid_h", pa.int32(), False, "rows of the image's valid token grid"),
    Column("grid_w", pa.int32(), False, "columns of the image's valid token grid"),
)

DETECTION_COLUMNS: tuple[Column, ...] = (
    *_KEY,
    Column("score", pa.float64(), False, "the model's probability of class_id for this query"),
    Column("x0", pa.float64(), False, "box left, original image pixels"),
    Column("y0", pa.float64(), False, "box top"),
    Column("x1", pa.float64(), False, "box right"),
    Column("y1", pa.float64(), False, "box bottom"),
    Column("image_h", pa.int32(), True, "original image height"),
    Column("image_w", pa.int32(), True, "original image width"),
    Column("input_h", pa.int32(), True, "height of the resized model input"),
    Column("input_w", pa.int32(), True, "width of the resized model input"),
    Column("stride", pa.int32(), True, "input pixels per token"),
    *_GRID,
    Column("logit", pa.float64(), False, "the class logit: the relevance the detection starts with"),
    Column("input_relevance", pa.float64(), False, "relevance reaching the encoder input tokens"),
    Column("bias_relevance", pa.float64(), False, "relevance absorbed by biases"),
    Column("pos_relevance", pa.float64(), False, "relevance absorbed by positional embeddings"),
    Column("softmax_relevance", pa.float64(), False, "relevance not conserved by the softmax rule"),
    Column("token_map", pa.list_(pa.float32()), False, "the detection's token relevance, row-major"),
)
CONCEPT_COLUMNS: tuple[Column, ...] = (
    *_KEY,
    Column("module", pa.string(), False, "encoder or decoder"),
    Column("layer", pa.int32(), False, "layer whose output channels are the concepts"),
    Column("feature", pa.int32(), False, "channel"),
    Column("relevance", pa.float64(), False, "the channel's relevance (encoder: over valid tokens; decoder: "
                                             "on the detection's own query)"),
    Column("share", pa.float64(), True, "relevance / logit (null when the logit is 0)"),
    Column("other_relevance", pa.float64(), True, "decoder: over the other queries; encoder: null"),
    Column("other_share", pa.float64(), True, "other_relevance / logit"),
)
CONCEPT_MAP_COLUMNS: tuple[Column, ...] = (
    *_KEY,
    Column("module", pa.string(), False, "encoder or decoder"),
    Column("layer", pa.int32(), False, "layer of the conditioning channel"),
    Column("feature", pa.int32(), False, "the conditioning channel"),
    Column("rank", pa.int32(), False, "0 = the detection's most relevant channel at this layer"),
    Column("relevance", pa.float64(), False, "relevance kept at the layer (the concept's)"),
    Column("input_relevance", pa.float64(), False, "of it, what reaches the input tokens"),
    *_GRID,
    Column("token_map", pa.list_(pa.float32()), False, "conditional token relevance, row-major"),
)
FAITHFULNESS_COLUMNS: tuple[Column, ...] = (
    *_KEY,
    Column("pointing_hit", pa.bool_(), False, "the most relevant token's patch overlaps the detection's box"),
    Column("auc_relevance", pa.float64(), False, "area under the logit curve, tokens deleted by relevance"),
    Column("auc_random", pa.float64(), False, "the same, random deletion orders (mean)"),
    Column("fractions", pa.list_(pa.float64()), False, "fraction of tokens deleted at each step"),
    Column("curve_relevance", pa.list_(pa.float64()), False, "1 + (logit - logit_0) / |logit_0|"),
    Column("curve_random", pa.list_(pa.float64()), False, "the same for random orders (mean)"),
)


def _schema(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in columns])


DETECTION_SCHEMA = _schema(DETECTION_COLUMNS)
CONCEPT_SCHEMA = _schema(CONCEPT_COLUMNS)
CONCEPT_MAP_SCHEMA = _schema(CONCEPT_MAP_COLUMNS)
FAITHFULNESS_SCHEMA = _schema(FAITHFULNESS_COLUMNS)

DETECTION_DATASETS: dict[str, pa.Schema] = {
    "concepts": CONCEPT_SCHEMA, "concept_maps": CONCEPT_MAP_SCHEMA, "faithfulness": FAITHFULNESS_SCHEMA,
    "detections": DETECTION_SCHEMA,
}
"""Folder name -> schema, in commit order: ``detections`` last (its part proves the batch complete)."""

BY_CLASS_NAME = "concepts_by_class.csv"
BY_CLASS_PARQUET = "concepts_by_class.parquet"
BY_CLASS_COLUMNS = ("class_id", "class_name", "module", "layer", "feature", "detections", "share_mean",
                    "share_std", "relevance_mean", "top_k_rate")
"""Columns of :func:`concepts_by_class` (and ``concepts_by_class.csv``)."""

NO_DETECTIONS_KEY = b"lrp_ray.no_detections"
ROWS_KEY = b"lrp_ray.rows"


def class_name(class_names: Sequence[str] | None, class_id: int) -> str | None:
    """The name of ``class_id`` (None without names or out of their range)."""
    if class_names is None or not 0 <= int(class_id) < len(class_names):
        return None
    return str(class_names[int(class_id)])


def _valid_block(a: np.ndarray, hw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[:int(hw[0]), :int(hw[1])], dtype=np.float32).reshape(-1)


def _lists(blocks: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """A list column of 1-D blocks (any lengths), built from one flat buffer."""
    offsets = np.zeros(len(blocks) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    flat = np.concatenate(blocks) if blocks else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, type=dtype))


def _key_columns(keys: list[tuple[str, int, int]], class_names: Sequence[str] | None) -> dict[str, Any]:
    return {"image": [k[0] for k in keys], "query": [k[1] for k in keys], "class_id": [k[2] for k in keys],
            "class_name": [class_name(class_names, k[2]) for k in keys]}


def detection_tables(batch: Any, image_names: Sequence[str], image_sizes: Sequence[Sequence[int]],
                     cfg: Any = None, class_names: Sequence[str] | None = None,
                     input_sizes: Sequence[Sequence[int]] | None = None) -> dict[str, pa.Table]:
    """Rows of one batch's :class:`lrp_ray.lrp.concepts.DetectionBatch`: ``detections``, ``concepts`` and
    ``concept_maps`` tables (image-major, then detection by score, then module/layer/channel). The
    ``detections`` table's metadata names the images where nothing was selected."""
    dets, rel = batch.dets, batch.relevance
    names = [str(n) for n in image_names]
    if len(names) != dets.query.shape[0]:
        raise ValueError(f"{len(names)} image names for {dets.query.shape[0]} images")
    stride = backbone_stride(cfg) if cfg is not None else None
    if input_sizes is None and cfg is not None:
        from lrp_ray.models.preprocess import resize_shape

        input_sizes = [resize_shape(int(h), int(w), int(cfg.min_size_test), int(cfg.max_size_test))
                       for h, w in image_sizes]
    slots = dets.items()
    keys = [(names[b], int(dets.query[b, m]), int(dets.class_id[b, m])) for b, m in slots]
    det: dict[str, Any] = _key_columns(keys, class_names)
    concepts: dict[str, list] = {c.name: [] for c in CONCEPT_COLUMNS}
    maps: dict[str, list] = {c.name: [] for c in CONCEPT_MAP_COLUMNS}
    if rel is not None:
        hw = np.asarray(rel.valid_hw)
        det.update({
            "score": [float(dets.score[b, m]) for b, m in slots],
            **{k: [float(dets.boxes[b, m, i]) for b, m in slots]
               for i, k in enumerate(("x0", "y0", "x1", "y1"))},
            "image_h": [int(image_sizes[b][0]) for b, _ in slots],
            "image_w": [int(image_sizes[b][1]) for b, _ in slots],
            "input_h": [int(input_sizes[b][0]) if input_sizes is not None else None for b, _ in slots],
            "input_w": [int(input_sizes[b][1]) if input_sizes is not None else None for b, _ in slots],
            "stride": [stride for _ in slots],
            "grid_h": [int(hw[b, 0]) for b, _ in slots], "grid_w": [int(hw[b, 1]) for b, _ in slots],
            "logit": [float(rel.logit[b, m]) for b, m in slots],
            **{k: [float(getattr(rel, k)[b, m]) for b, m in slots]
               for k in ("input_relevance", "bias_relevance", "pos_relevance", "softmax_relevance")},
            "token_map": _lists([_valid_block(rel.token_maps[b, m], hw[b]) for b, m in slots], pa.float32()),
        })
        _concept_rows(rel, slots, keys, class_names, concepts)
        _map_rows(batch.conditional, rel, slots, keys, class_names, maps)
    else:
        det.update({c.name: [] for c in DETECTION_COLUMNS if c.name not in det})
    empty = [names[b] for b in dets.no_detections]
    detections = pa.Table.from_pydict(det, schema=DETECTION_SCHEMA).replace_schema_metadata(
        {NO_DETECTIONS_KEY: json.dumps(empty).encode()})
    return {"detections": detections, "concepts": pa.Table.from_pydict(concepts, schema=CONCEPT_SCHEMA),
            "concept_maps": pa.Table.from_pydict(maps, schema=CONCEPT_MAP_SCHEMA)}


def _concept_rows(rel: Any, slots: list[tuple[int, int]], keys: list[tuple[str, int, int]],
                  class_names: Sequence[str] | None, out: dict[str, list]) -> None:
    for (module, layer), conc in sorted(rel.concepts.items()):
        other = rel.others.get((module, layer))
        for (b, m), key in zip(slots, keys, strict=True):
            r = np.asarray(conc[b, m], dtype=np.float64)
            total = float(rel.logit[b, m])
            o = np.asarray(other[b, m], dtype=np.float64) if other is not None else None
            n = len(r)
            out["image"] += [key[0]] * n
            out["query"] += [key[1]] * n
            out["class_id"] += [key[2]] * n
            out["class_name"] += [class_name(class_names, key[2])] * n
            out["module"] += [module] * n
            out["layer"] += [int(layer)] * n
            out["feature"] += list(range(n))
            out["relevance"] += r.tolist()
            out["share"] += (r / total).tolist() if total != 0 else [None] * n
            out["other_relevance"] += o.tolist() if o is not None else [None] * n
            out["other_share"] += (o / total).tolist() if o is not None and total != 0 else [None] * n


def _map_rows(conditional: dict, rel: Any, slots: list[tuple[int, int]], keys: list[tuple[str, int, int]],
              class_names: Sequence[str] | None, out: dict[str, list]) -> None:
    hw = np.asarray(rel.valid_hw)
    for (module, layer), cond in sorted(conditional.items()):
        for (b, m), key in zip(slots, keys, strict=True):
            for k in range(cond.channels.shape[-1]):
                out["image"].append(key[0])
                out["query"].append(key[1])
                out["class_id"].append(key[2])
                out["class_name"].append(class_name(class_names, key[2]))
                out["module"].append(module)
                out["layer"].append(int(layer))
                out["feature"].append(int(cond.channels[b, m, k]))
                out["rank"].append(k)
                out["relevance"].append(float(cond.target_relevance[b, m, k]))
                out["input_relevance"].append(float(cond.input_relevance[b, m, k]))
                out["grid_h"].append(int(hw[b, 0]))
                out["grid_w"].append(int(hw[b, 1]))
                out["token_map"].append(_valid_block(cond.token_maps[b, m, k], hw[b]))
    out["token_map"] = _lists(out["token_map"], pa.float32())  # type: ignore[assignment]


def faithfulness_table(frame: pd.DataFrame, class_names: Sequence[str] | None = None) -> pa.Table:
    """The ``faithfulness`` rows of :func:`lrp_ray.faithfulness.detection_faithfulness`'s frame."""
    data: dict[str, Any] = {c.name: [] for c in FAITHFULNESS_COLUMNS}
    for r in frame.itertuples(index=False):
        data["image"].append(str(r.image))
        data["query"].append(int(r.query))
        data["class_id"].append(int(r.class_id))
        data["class_name"].append(class_name(class_names, int(r.class_id)))
        data["pointing_hit"].append(bool(r.pointing_hit))
        data["auc_relevance"].append(float(r.auc_relevance))
        data["auc_random"].append(float(r.auc_random))
        for c in ("fractions", "curve_relevance", "curve_random"):
            data[c].append([float(v) for v in getattr(r, c)])
    return pa.Table.from_pydict(data, schema=FAITHFULNESS_SCHEMA)


def tables_to_frames(tables: Iterable[dict[str, pa.Table]]) -> dict[str, pd.DataFrame]:
    """Concatenated frames of batches' tables (each dataset once, empty frames with their columns);
    int32 columns stay int32, list columns hold numpy arrays."""
    tables = list(tables)
    out = {}
    for name, schema in DETECTION_DATASETS.items():
        parts = [t[name].replace_schema_metadata(None) for t in tables if name in t]
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        out[name] = _frame(table)
    return out


def _frame(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    for f in table.schema:
        if f.type == pa.int32() and not df[f.name].isna().any():
            df[f.name] = df[f.name].astype(np.int32)
        elif pa.types.is_list(f.type):
            df[f.name] = [np.asarray(v) for v in df[f.name]]
    return df


# -------------------------------------------------------------------------------------- per class
def concepts_by_class(frames: Iterable[pd.DataFrame], top_k: int) -> pd.DataFrame:
    """Per class, over all its explained detections: each (module, layer, feature)'s mean and spread of
    its share of the class logit, its mean relevance, and how often it is among a detection's ``top_k``
    channels at that layer. Streams: ``frames`` are concept rows in any grouping that keeps each
    detection's layer whole (a part file, a batch). Sorted by class, then mean share, highest first."""
    keys = ["class_id", "class_name", "module", "layer", "feature"]
    acc: pd.DataFrame | None = None
    for c in frames:
        if c.empty:
            continue
        c = c.assign(class_name=c["class_name"].fillna(""))
        rank = c.groupby(["image", "query", "class_id", "module", "layer"])["relevance"].rank(
            ascending=False, method="first")
        share = c["share"].astype(np.float64)
        part = c.assign(n=share.notna().astype(np.int64), s=share.fillna(0.0), s2=share.fillna(0.0) ** 2,
                        r=c["relevance"].astype(np.float64), top=(rank <= top_k).astype(np.int64),
                        count=1).groupby(keys, sort=False)[["count", "n", "s", "s2", "r", "top"]].sum()
        acc = part if acc is None else acc.add(part, fill_value=0)
    if acc is None:
        return pd.DataFrame({k: pd.Series(dtype=t) for k, t in zip(
            BY_CLASS_COLUMNS, ("int32", "object", "object", "int32", "int32", "int64", "float64", "float64",
                               "float64", "float64"), strict=True)})
    acc = acc.reset_index()
    n = acc["n"].where(acc["n"] > 0)
    mean = acc["s"] / n
    var = (acc["s2"] / n - mean ** 2).clip(lower=0) * n / (n - 1).where(n > 1)
    out = pd.DataFrame({
        "class_id": acc["class_id"].astype(np.int32), "class_name": acc["class_name"].replace("", None),
        "module": acc["module"], "layer": acc["layer"].astype(np.int32),
        "feature": acc["feature"].astype(np.int32), "detections": acc["count"].astype(np.int64),
        "share_mean": mean, "share_std": np.sqrt(var).fillna(0.0),
        "relevance_mean": acc["r"] / acc["count"], "top_k_rate": acc["top"] / acc["count"]})
    out = out.sort_values(["class_id", "share_mean", "module", "layer", "feature"],
                          ascending=[True, False, True, True, True], kind="stable")
    return out.reset_index(drop=True)[list(BY_CLASS_COLUMNS)]


# ------------------------------------------------------------------------------------------ reading
def detection_dataset_files(out: str | Path, name: str) -> list[Path]:
    """The part files of flat dataset ``name`` (``detections``, ``concepts``, ``pixels``, ...) of the
    request in OUT (by the manifest's digest), sorted."""
    from .dataset import DATASET_NAME, _request_tag

    root = Path(out) / name
    if not root.is_dir():
        return []
    tag = _request_tag(Path(out) / DATASET_NAME)  # the request of OUT's manifest
    pattern = f"part-*-{tag}.parquet" if tag else "part-*.parquet"
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _load(out: str | Path, name: str, columns: Sequence[str] | None = None,
          filters: Any = None) -> pd.DataFrame | None:
    files = detection_dataset_files(out, name)
    if not files:
        return None
    schema = DETECTION_DATASETS[name]
    cols = list(columns) if columns is not None else None
    table = pq.ParquetDataset([str(f) for f in files], schema=schema, filters=filters).read(columns=cols)
    return _frame(table.replace_schema_metadata(None))


def load_detections(out: str | Path, columns: Sequence[str] | None = None,
                    filters: Any = None) -> pd.DataFrame | None:
    """Every explained detection of the sweep in OUT (None: the run had no detection targets)."""
    return _load(out, "detections", columns, filters)


def load_concepts(out: str | Path, columns: Sequence[str] | None = None,
                  filters: Any = None) -> pd.DataFrame | None:
    """Concept rows (detection x layer x channel); ``filters`` as for pandas' ``read_parquet``."""
    return _load(out, "concepts", columns, filters)


def load_concept_maps(out: str | Path, columns: Sequence[str] | None = None,
                      filters: Any = None) -> pd.DataFrame | None:
    """Conditional maps of each detection's top channels."""
    return _load(out, "concept_maps", columns, filters)


def read_faithfulness(out: str | Path) -> pd.DataFrame | None:
    """Deletion curves and pointing game per detection (None when not computed)."""
    return _load(out, "faithfulness")


def read_concepts_by_class(out: str | Path) -> pd.DataFrame | None:
    """The per-class ranking (``concepts_by_class.parquet``, exact; else the CSV; None when the run has
    none)."""
    exact = Path(out) / BY_CLASS_PARQUET
    if exact.is_file():
        return pd.read_parquet(exact)
    path = Path(out) / BY_CLASS_NAME
    if not path.is_file():
        return None
    df = pd.read_csv(path, keep_default_na=False, na_values={"share_mean": [""], "share_std": [""]})
    df["class_name"] = df["class_name"].replace("", None)
    return df


def no_detection_images(out: str | Path) -> list[str]:
    """Images of the sweep where the selection picked nothing."""
    names: list[str] = []
    for f in detection_dataset_files(out, "detections"):
        meta = pq.read_schema(f).metadata or {}
        names += json.loads(meta.get(NO_DETECTIONS_KEY, b"[]"))
    return names
