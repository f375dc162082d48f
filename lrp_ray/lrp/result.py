"""Relevance results for one (module, layer) call: numpy arrays per image x target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


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

    def records(self, image_ids: Sequence[str] | None = None) -> list[dict]:
        """One dict per image x target (the columns of the sweep's Parquet rows)."""
        ids = list(image_ids) if image_ids is not None else [str(i) for i in range(self.n_images)]
        if len(ids) != self.n_images:
            raise ValueError(f"{len(ids)} image ids for {self.n_images} images")
        rows = []
        for b in range(self.n_images):
            h, w = (int(v) for v in self.valid_hw[b])
            for n in range(self.n_targets):
                q = int(self.queries[b, n])
                rows.append({
                    "image": ids[b], "module": self.module, "layer": self.layer,
                    "feature": int(self.features[n]), "query": None if q < 0 else q,
                    "act_sum": float(self.act_sum[b, n]), "act_max": float(self.act_max[b, n]),
                    "act_mean": float(self.act_mean[b, n]),
                    "relevance_total": float(self.target_relevance[b, n]),
                    "input_relevance": float(self.input_relevance[b, n]),
                    "bias_relevance": float(self.bias_relevance[b, n]),
                    "token_map": self.token_maps[b, n, :h, :w].astype(np.float32).ravel(),
                    "grid_h": h, "grid_w": w,
                    "channel_relevance": self.channel_relevance[b, n].astype(np.float32),
                    "profile": self.profile[b, n].astype(np.float64),
                    "rules": self.rules, "epsilon": float(self.epsilon), "precision": self.precision,
                })
        return rows

    def to_frame(self, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """A DataFrame with one row per image x target."""
        df = pd.DataFrame.from_records(self.records(image_ids))
        df["query"] = df["query"].astype("Int64")
        return df

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
