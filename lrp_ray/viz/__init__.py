"""Pictures of relevance results: heatmap overlays (see :mod:`lrp_ray.viz.heatmaps`)."""

from .heatmaps import overlay_png, render_overlay, write_top_heatmaps

__all__ = ["overlay_png", "render_overlay", "write_top_heatmaps"]
