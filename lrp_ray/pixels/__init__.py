"""Pixel-level relevance: LRP continued from the transformer's input tokens through ``input_proj`` and the
ResNet backbone to the image, with zennit's rules and canonizers (ours for the detectron2-named ResNet).

- :mod:`.composites`  zennit composites by name (default EpsilonPlusFlat), their identity
- :mod:`.canonizers`  FrozenBatchNorm folding and residual sums for our ResNet layout
- :mod:`.backbone`    the vectorised backward (K targets per backward): BackbonePropagator
- :mod:`.walk`        its explicit walk of our ResNet layout (zennit's rules, K-batched transposed convs)
- :mod:`.maps`        sum-preserving resampling to the original image grid, block sums to a max side
- :mod:`.targets`     entry points: feature targets, detections, any token x channel relevance
"""

from .backbone import BackbonePropagator, PixelNet, find_body
from .composites import COMPOSITES, DEFAULT_COMPOSITE, CompositeSpec, resolve_composite
from .maps import DEFAULT_MAX_SIDE, block_sum, reduced_shape, to_image_grid
from .targets import (
    PixelMaps,
    detection_pixel_maps,
    feature_pixel_maps,
    pixel_maps_from_tokens,
    propagator_for,
)

__all__ = ["BackbonePropagator", "PixelNet", "find_body", "COMPOSITES", "DEFAULT_COMPOSITE",
           "CompositeSpec", "resolve_composite", "DEFAULT_MAX_SIDE", "block_sum", "reduced_shape",
           "to_image_grid", "PixelMaps", "detection_pixel_maps", "feature_pixel_maps",
           "pixel_maps_from_tokens", "propagator_for"]
