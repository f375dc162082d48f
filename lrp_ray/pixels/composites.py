"""The zennit composites a pixel map can use, chosen by name (rules as data).

Each entry names a zennit composite and its parameters. ``EpsilonPlusFlat`` (the default),
``EpsilonGammaBox`` and ``EpsilonAlpha2Beta1Flat`` are zennit's own; ``EpsilonFlat`` (the epsilon rule on
every convolution, flat on the first) is built from zennit's rules and is the setting under which the
backbone conserves relevance exactly when its biases are zero (used by the checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import torch
from zennit.composites import (
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite
from zennit.rules import Epsilon, Flat
from zennit.types import Convolution, Linear

__all__ = ["CompositeSpec", "COMPOSITES", "DEFAULT_COMPOSITE", "resolve_composite", "pixel_box"]

DEFAULT_COMPOSITE = "EpsilonPlusFlat"


@dataclass(frozen=True)
class CompositeSpec:
    """A named zennit composite and the parameters that change its numbers."""

    name: str
    epsilon: float = 1e-6
    stabilizer: float = 1e-6
    gamma: float | None = None
    box: bool = False
    """The first layer's rule needs the input's value box (ZBox: lowest/highest normalised pixel)."""

    def build(self, canonizers: Sequence[Any], low: torch.Tensor | None = None,
              high: torch.Tensor | None = None) -> Composite:
        """The zennit composite with ``canonizers`` (``low``/``high`` [1,3,1,1] for box rules)."""
        c = list(canonizers)
        if self.name == "EpsilonPlusFlat":
            return EpsilonPlusFlat(epsilon=self.epsilon, stabilizer=self.stabilizer, canonizers=c)
        if self.name == "EpsilonAlpha2Beta1Flat":
            return EpsilonAlpha2Beta1Flat(epsilon=self.epsilon, stabilizer=self.stabilizer, canonizers=c)
        if self.name == "EpsilonGammaBox":
            if low is None or high is None:
                raise ValueError("EpsilonGammaBox needs the input box (low, high)")
            return EpsilonGammaBox(low=low, high=high, epsilon=self.epsilon, gamma=float(self.gamma or 0.25),
                                   stabilizer=self.stabilizer, canonizers=c)
        if self.name == "EpsilonFlat":
            layer_map = layer_map_base(self.stabilizer) + [(Convolution, Epsilon(epsilon=self.epsilon)),
                                                           (torch.nn.Linear, Epsilon(epsilon=self.epsilon))]
            return SpecialFirstLayerMapComposite(layer_map=layer_map,
                                                 first_map=[(Linear, Flat(stabilizer=self.stabilizer))],
                                                 canonizers=c)
        raise ValueError(f"unknown composite {self.name!r}")  # pragma: no cover - resolve_composite checks

    def identity(self) -> dict[str, Any]:
        """JSON-able description for a result's identity (name, parameters, zennit version)."""
        return {**{f"pixel_{k}": v for k, v in asdict(self).items() if k != "box"},
                "zennit_version": version("zennit")}


COMPOSITES: dict[str, CompositeSpec] = {
    "EpsilonPlusFlat": CompositeSpec("EpsilonPlusFlat"),
    "EpsilonGammaBox": CompositeSpec("EpsilonGammaBox", gamma=0.25, box=True),
    "EpsilonAlpha2Beta1Flat": CompositeSpec("EpsilonAlpha2Beta1Flat"),
    "EpsilonFlat": CompositeSpec("EpsilonFlat"),
}


def resolve_composite(composite: str | CompositeSpec) -> CompositeSpec:
    """The spec named ``composite`` (ValueError listing the known names otherwise)."""
    if isinstance(composite, CompositeSpec):
        return composite
    spec = COMPOSITES.get(str(composite))
    if spec is None:
        raise ValueError(f"unknown composite {composite!r}: choose one of {', '.join(COMPOSITES)}")
    return spec


def pixel_box(cfg: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised input's value box per channel, (0 - mean) / std and (255 - mean) / std [1,3,1,1],
    from a config with ``pixel_mean``/``pixel_std`` (ImageNet statistics when ``cfg`` is None)."""
    mean = getattr(cfg, "pixel_mean", None) or (123.675, 116.28, 103.53)
    std = getattr(cfg, "pixel_std", None) or (58.395, 57.12, 57.375)
    m = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1)
    return (0.0 - m) / s, (255.0 - m) / s
