"""Decoder query selections shared by the engine and the sweep: ``'all'``, ``'topK'`` or explicit ids."""

from __future__ import annotations

import re

__all__ = ["top_k"]

_TOP_K = re.compile(r"\s*top([1-9]\d*)\s*")


def top_k(queries: object) -> int | None:
    """K of a ``'topK'`` selection (``'top5'`` -> 5, case-insensitive); None for anything else. The one
    topK parser of the project."""
    if isinstance(queries, str):
        m = _TOP_K.fullmatch(queries.lower())
        if m:
            return int(m.group(1))
    return None
