"""Drop-in replacement for the thesis code's ``calc_lrp.main(...)``.

Same signature and meaning; instead of one full forward and backward per image and feature, one
forward per image batch feeds the batched LRP engine. Writes one CSV row per image (per image and query
for the decoder) and returns the DataFrame.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .api import explain, load_model
from .results import SCHEMA

_LIST_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_list(f.type))
"""Columns written as JSON lists (the row columns are those of :mod:`lrp_ray.results`)."""


def main(images_dir: str | Path, layer_index: int = 5, feature_index: int | list[int] = 233,
         which_module: str = "encoder", output_csv: str | Path = "lrp_result.csv",
         weights_path: str | Path | None = None, batch_size: int = 4, config_path: str | Path | None = None,
         queries: Any = "all", rules: str = "cp", epsilon: float = 1e-6, device: str = "auto",
         precision: str = "fp32", **_ignored: Any) -> pd.DataFrame:
    """Run LRP for ``feature_index`` of ``which_module`` layer ``layer_index`` on every image of
    ``images_dir`` and write ``output_csv``. Extra keyword arguments of the old code (e.g.
    ``use_model_cache``) are accepted and ignored.
    """
    module = {"encoder": "encoder", "decoder": "decoder"}.get(str(which_module).lower())
    if module is None:
        raise ValueError(f"which_module must be 'encoder' or 'decoder', got {which_module!r}")
    model = load_model(config_path, weights_path, device="cpu")
    df = explain(model, images_dir, module, int(layer_index), feature_index,
                 queries=queries if module == "decoder" else None, rules=rules, epsilon=epsilon,
                 batch_size=batch_size, device=device, precision=precision)
    out = df.copy()
    for col in _LIST_COLUMNS:
        if col in out:
            out[col] = [json.dumps([round(float(v), 7) for v in x]) for x in out[col]]
    output_csv = Path(output_csv)
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(output_csv, index=False)
    for err in df.attrs.get("errors", []):
        print(f"skipped {err['image']}: {err['reason']}")
    print(f"LRP {module} layer {layer_index}, feature(s) {feature_index}: {len(df)} rows -> {output_csv}")
    return df
