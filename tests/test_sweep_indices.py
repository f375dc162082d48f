"""Index and query parsers, fuzzed: bounds are checked before anything is expanded; errors are one line."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrp_ray.queries import top_k
from lrp_ray.sweep.indices import (
    MAX_INDEX,
    BadRequest,
    format_indices,
    parse_index_list,
    parse_queries,
    resolve_indices,
)


def test_huge_ranges_fail_at_once_without_expanding():
    t0 = time.perf_counter()
    for text in ("0-30000000", "0-9999999999999999999", "5,0-4000000000", "99999999999"):
        with pytest.raises(ValueError, match="too large"):
            parse_index_list(text, "features")
    assert time.perf_counter() - t0 < 1.0  # (a bound on work done, not a benchmark: 3.3 GB took 34 s)
    with pytest.raises(BadRequest, match="too large"):
        resolve_indices("0-30000000", 256, "features")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789-, alltop", max_size=24))
def test_any_text_parses_or_fails_with_one_line(text):
    try:
        idx = parse_index_list(text, "features")
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("features")
        return
    assert idx is None or (idx == sorted(set(idx)) and all(0 <= i < MAX_INDEX for i in idx))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=60))
def test_format_and_parse_round_trip(values):
    idx = sorted(set(values))
    assert parse_index_list(format_indices(idx)) == idx


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_query_selections_parse_or_fail_with_one_line(text):
    try:
        q = parse_queries(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    k = top_k(q)
    assert q == "all" or (k is not None and k >= 1) or isinstance(q, list)


def test_top_k_is_the_one_parser():
    assert top_k("top5") == 5 and top_k(" TOP12 ") == 12
    assert top_k("top0") is None and top_k("top01") is None and top_k("all") is None and top_k([1]) is None
