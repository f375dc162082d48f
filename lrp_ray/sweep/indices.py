"""Index lists of a request: ``'all'``, ``'0-5'``, ``'0,3,5'``, query selections ``'topK'``.

Syntax is checked when a request is read; ranges are checked against the model once it is loaded. Ranges
are bounded before they are expanded, so a request like ``0-30000000`` fails at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lrp_ray.queries import top_k

__all__ = ["BadRequest", "parse_index_list", "resolve_indices", "parse_queries", "check_queries",
           "format_indices", "top_k", "targets_per_feature", "MAX_INDEX", "parse_detection_pairs"]


class BadRequest(ValueError):
    """A request that cannot run (exit code 2): one line naming the problem and what is valid."""


MAX_INDEX = 1 << 20
"""Indices are below this (no model has a million layers, features or queries): bounds are checked
before a range is expanded."""

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_index_list(value: Any, what: str = "indices") -> list[int] | None:
    """``'all'`` -> None; ``'0-5'``, ``'0,3,5'``, ``'1-3,7'``, ``5``, ``[0, 3]`` -> sorted unique ints."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected 'all', 'a-b', 'a,b,c' or a list of integers, got {value!r}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return None
        out: list[int] = []
        for part in text.split(","):
            part = part.strip()
            m = _RANGE.match(part)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError(f"{what}: range {part!r} runs backwards")
                if b >= MAX_INDEX:
                    raise ValueError(f"{what}: {b} is too large (indices are below {MAX_INDEX})")
                out.extend(range(a, b + 1))
            elif part.isdigit():
                if int(part) >= MAX_INDEX:
                    raise ValueError(f"{what}: {part} is too large (indices are below {MAX_INDEX})")
                out.append(int(part))
            else:
                raise ValueError(f"{what}: cannot read {value!r}; expected 'all', 'a-b', 'a,b,c' "
                                 "(non-negative integers)")
        value = out
    if isinstance(value, (list, tuple)):
        ints = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what}: expected non-negative integers, got {v!r}")
            ints.append(v)
        if not ints:
            raise ValueError(f"{what}: empty list")
        return sorted(set(ints))
    raise ValueError(f"{what}: expected 'all', 'a-b', 'a,b,c' or a list of integers, got {value!r}")


def resolve_indices(value: Any, n: int, what: str) -> list[int]:
    """Indices of ``value`` checked against ``0..n-1``; :class:`BadRequest` when out of range."""
    try:
        idx = parse_index_list(value, what)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if idx is None:
        return list(range(n))
    bad = [i for i in idx if i >= n]
    if bad:
        raise BadRequest(f"{what} {format_indices(bad)} out of range: this model has {n} ({what} 0-{n - 1})")
    return idx


def parse_queries(value: Any) -> str | list[int]:
    """``'all'``, ``'topK'`` or a list of query ids (``'0,3'`` accepted)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all" or top_k(text) is not None:
            return text
        try:
            ids = parse_index_list(text, "queries")
        except ValueError:
            raise ValueError(f"queries: expected 'all', 'topK' (e.g. 'top5') or ids like '0,3', "
                             f"got {value!r}") from None
        if ids is None:
            return "all"
        return ids
    ids = parse_index_list(value, "queries")
    return "all" if ids is None else ids


def check_queries(value: Any, num_queries: int) -> str | list[int]:
    """Queries checked against the model's number of object queries (:class:`BadRequest` if not)."""
    q = parse_queries(value)
    k = top_k(q)
    if k is not None:
        if k > num_queries:
            raise BadRequest(f"queries {q}: this model has {num_queries} object queries "
                             f"(top1-top{num_queries})")
    elif isinstance(q, list):
        bad = [i for i in q if i >= num_queries]
        if bad:
            raise BadRequest(f"queries {format_indices(bad)} out of range: this model has {num_queries} "
                             f"object queries (0-{num_queries - 1})")
    return q


def format_indices(idx: Sequence[int]) -> str:
    """Compact text of sorted indices: ``[0,1,2,3,7]`` -> ``'0-3,7'``."""
    idx = list(idx)
    if not idx:
        return ""
    parts = []
    start = prev = idx[0]
    for i in idx[1:]:
        if i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def targets_per_feature(queries: Any, num_queries: int) -> int:
    """Rows per image and feature of a decoder target selection (``'all'``, ``'topK'`` or ids)."""
    if queries == "all":
        return num_queries
    k = top_k(queries)
    return k if k is not None else len(queries)


_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_detection_pairs(text: str) -> list[tuple[int, int]]:
    """``'3:1,7:1'`` -> ``[(3, 1), (7, 1)]`` (query:class_id pairs; ranges are checked with the model)."""
    pairs = []
    for part in text.split(","):
        m = _PAIR.match(part)
        if not m:
            raise ValueError(f"detections: expected 'query:class_id' pairs like '3:1,7:1', got {text!r}")
        q, c = int(m.group(1)), int(m.group(2))
        if q >= MAX_INDEX or c >= MAX_INDEX:
            raise ValueError(f"detections: index too large in {text!r}")
        pairs.append((q, c))
    return pairs
