"""Relevance results for one (module, layer) call: numpy arrays per image x target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..results import result_frame, result_to_table


@dataclass
class RelevanceResult:
    """Arrays are indexed ``[image, target]``; token maps are on the padded grid with padding zeroed."""

    module: str
    layer: int
    rules: str
    epsilon: float
    precision: str
    features: np.ndarray            # [N]
    queries: np.ndarray             # [B, N], -1 for encoder targets
    valid_hw: np.ndarray            # [B, 2]
    token_maps: np.ndarray          # [B, N, h, w]
    channel_relevance: np.ndarray   # [B, N, d]
    profile: np.ndarray             # [B, N, P]
    profile_names: list[str]
    target_relevance: np.ndarray    # [B, N]
    input_relevance: np.ndarray     # [B, N]
    bias_relevance: np.ndarray      # [B, N]
    pos_relevance: np.ndarray       # [B, N]
    softmax_relevance: np.ndarray   # [B, N]
    act_sum: np.ndarray             # [B, N]
    act_max: np.ndarray             # [B, N]
    act_mean: np.ndarray            # [B, N]

    @property
    def n_images(self) -> int:
        return int(self.queries.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.features.shape[0])

    def token_map(self, image: int, target: int) -> np.ndarray:
        """Token relevance of one image and target on that image's own (unpadded) grid."""
        h, w = self.valid_hw[image]
        return self.token_maps[image, target, :h, :w]

    def records(self, image_ids: Sequence[str] | None = None,
                image_sizes: Sequence[Sequence[int]] | None = None, **geometry: Any) -> list[dict]:
        """One dict per image x target: a sweep row (``module``, ``layer`` and the columns of
        :data:`lrp_ray.results.SCHEMA`) with Python values, None for null."""
        ids = [str(i) for i in range(self.n_images)] if image_ids is None else list(image_ids)
        rows = result_to_table(self, ids, image_sizes, **geometry).to_pylist()
        return [{"module": self.module, "layer": int(self.layer), **r} for r in rows]

    def to_frame(self, image_ids: Sequence[str] | None = None,
                 image_sizes: Sequence[Sequence[int]] | None = None, **geometry: Any) -> pd.DataFrame:
        """A DataFrame with one row per image x target, with the columns and dtypes of
        :func:`lrp_ray.results.load`. ``image_sizes``: original (h, w) per image; ``geometry``:
        ``stride``, ``input_sizes`` or ``cfg`` (see :func:`lrp_ray.results.result_to_table`)."""
        return result_frame(self, image_ids, image_sizes, **geometry)

    @staticmethod
    def concat(parts: list[RelevanceResult]) -> RelevanceResult:
        """Join results of the same (module, layer) computed in target chunks."""
        first = parts[0]
        if len(parts) == 1:
            return first
        cat1 = lambda name: np.concatenate([getattr(p, name) for p in parts], axis=1)
        return RelevanceResult(
            module=first.module, layer=first.layer, rules=first.rules, epsilon=first.epsilon,
            precision=first.precision, features=np.concatenate([p.features for p in parts]),
            queries=cat1("queries"), valid_hw=first.valid_hw, token_maps=cat1("token_maps"),
            channel_relevance=cat1("channel_relevance"), profile=cat1("profile"),
            profile_names=first.profile_names, target_relevance=cat1("target_relevance"),
            input_relevance=cat1("input_relevance"), bias_relevance=cat1("bias_relevance"),
            pos_relevance=cat1("pos_relevance"), softmax_relevance=cat1("softmax_relevance"),
            act_sum=cat1("act_sum"), act_max=cat1("act_max"), act_mean=cat1("act_mean"),
        )
