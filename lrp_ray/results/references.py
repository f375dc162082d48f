"""Reference images of a feature: its top rows by activation (ActMax) and by relevance (RelMax).

For every swept (module, layer, feature), the ``top`` rows by ``act_mean`` and the ``top`` rows by
``input_relevance`` (ties: image name, then query); a decoder row is an (image, query) pair. These are the
images a feature atlas shows first and the ones a sweep's ``--pixels topN`` computes pixel maps for. Read
one (module, layer) partition at a time.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .dataset import partitions, read_parts

__all__ = ["REFERENCE_COLUMNS", "reference_rows"]

REFERENCE_COLUMNS = ("module", "layer", "feature", "image", "query", "by")
"""``by``: ``activation``, ``relevance`` or ``both`` (the row is in both rankings)."""

_RANKINGS = {"activation": "act_mean", "relevance": "input_relevance"}


def _top(df: pd.DataFrame, column: str, top: int) -> pd.DataFrame:
    ordered = df.sort_values(["feature", column, "image", "query"], ascending=[True, False, True, True],
                             kind="stable")
    return ordered.groupby("feature", sort=True).head(top)


def reference_rows(out: str | Path, top: int) -> pd.DataFrame:
    """The reference rows of every swept feature of the request in ``out`` (``query`` -1 for encoder)."""
    frames = []
    for (module, layer), files in partitions(out).items():
        t = read_parts(files, ["image", "feature", "query", "act_mean", "input_relevance"]).to_pandas()
        if t.empty:
            continue
        t["query"] = t["query"].fillna(-1).astype(int)
        picks = []
        for by, column in _RANKINGS.items():
            picks.append(_top(t, column, top)[["feature", "image", "query"]].assign(by=by))
        both = pd.concat(picks, ignore_index=True)
        n = both.groupby(["feature", "image", "query"], sort=False)["by"].transform("size")
        both.loc[n > 1, "by"] = "both"
        both = both.drop_duplicates(["feature", "image", "query"])
        frames.append(both.assign(module=module, layer=int(layer)))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("module", "image", "by") else "int64")
                             for c in REFERENCE_COLUMNS})
    out_df = pd.concat(frames, ignore_index=True)[list(REFERENCE_COLUMNS)]
    out_df["image"] = out_df["image"].astype(str)
    return out_df.sort_values(["module", "layer", "feature", "image", "query"], kind="stable",
                              key=lambda s: s.map({"encoder": 0, "decoder": 1}) if s.name == "module" else s
                              ).reset_index(drop=True)
