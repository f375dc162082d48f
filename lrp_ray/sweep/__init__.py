"""Ray service: ``python -m lrp_ray.sweep`` / ``lrp-ray``. Knows nothing of LRP rules (passes names through).

``run_sweep(SweepSpec(...))`` is the in-process API; ray is imported only when a sweep runs.
"""

from .spec import BadRequest, SweepSpec

__all__ = ["BadRequest", "SweepSpec", "run_sweep", "prepare", "execute", "main"]


def __getattr__(name: str):
    if name in ("run_sweep", "prepare", "execute"):
        from . import execution as _execute
        from . import preparation as _prepare

        return getattr(_prepare if name == "prepare" else _execute, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(name)
