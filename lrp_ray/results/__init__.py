"""The output format of lrp_ray, in one place: rows, the dataset folder and the manifest.

A results folder ``OUT`` holds ``relevance/module=<m>/layer=<l>/part-*.parquet`` (rows in the
:data:`SCHEMA` layout, one per image x target), ``manifest.json`` (:class:`Manifest`), ``summary.csv``
and ``errors.csv``. Read rows with :func:`load` (pandas) or :func:`load_table` / :func:`dataset` (Arrow);
frames from :func:`lrp_ray.api.explain` have the same columns and dtypes. :data:`SCHEMA_VERSION` is the
format's version (manifests without one are version 1).
"""

from .dataset import (
    CONSERVATION_COLUMNS,
    DATASET_NAME,
    PART_GLOB,
    conservation,
    conservation_residual,
    dataset,
    iter_parts,
    load,
    load_table,
    part_files,
    partitions,
    read_parts,
    relevance_dir,
)
from .detections import (
    load_concept_maps,
    load_concepts,
    load_detections,
    no_detection_images,
    read_concepts_by_class,
    read_faithfulness,
)
from .files import atomic_path, atomic_write_text
from .manifest import (
    MANIFEST_NAME,
    STATUSES,
    Counts,
    HeatmapsInfo,
    Manifest,
    ManifestError,
    ModelInfo,
    PeakMemory,
    RunInfo,
    Selection,
    read_manifest,
    write_manifest,
)
from .names import image_name, image_path, image_text
from .schema import (
    COLUMNS,
    CONSERVATION_PARTS,
    FRAME_COLUMNS,
    FRAME_SCHEMA,
    PARTITION_SCHEMA,
    SCHEMA,
    SCHEMA_VERSION,
    Column,
    backbone_stride,
    empty_frame,
    result_frame,
    result_to_table,
    table_to_frame,
)

__all__ = [
    "image_text", "image_name", "image_path",
    "SCHEMA_VERSION", "SCHEMA", "FRAME_SCHEMA", "FRAME_COLUMNS", "PARTITION_SCHEMA", "COLUMNS", "Column",
    "CONSERVATION_PARTS", "CONSERVATION_COLUMNS", "backbone_stride", "result_to_table", "result_frame",
    "table_to_frame", "empty_frame",
    "DATASET_NAME", "PART_GLOB", "relevance_dir", "part_files", "partitions", "dataset", "load_table", "load",
    "read_parts", "iter_parts", "conservation", "conservation_residual",
    "Manifest", "ModelInfo", "Selection", "RunInfo", "Counts", "PeakMemory", "HeatmapsInfo", "ManifestError",
    "STATUSES", "MANIFEST_NAME", "read_manifest", "write_manifest",
    "atomic_path", "atomic_write_text",
    "load_detections", "load_concepts", "load_concept_maps", "read_concepts_by_class", "read_faithfulness",
    "no_detection_images",
]
