"""lrp_ray: LRP sweeps over DETR transformers, distributed with Ray."""

__version__ = "0.1.0"
