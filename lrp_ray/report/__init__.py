"""The report of a sweep results folder: ``python -m lrp_ray.report OUT`` writes the run page
``OUT/report.html`` and the feature atlas ``OUT/atlas/`` (an index of every swept feature and one page per
feature)."""

from .atlas import AtlasResult, build_atlas
from .build import build_report
from .folder import ReportError

__all__ = ["build_report", "build_atlas", "AtlasResult", "ReportError"]
