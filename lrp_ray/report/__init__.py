"""Static HTML report of a sweep results folder: ``python -m lrp_ray.report OUT``."""

from .build import ReportError, build_report

__all__ = ["build_report", "ReportError"]
