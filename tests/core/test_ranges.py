"""Range headers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.ranges import parse_range
from p2pd.errors import RangeInvalid, RangeNotSatisfiable


def test_no_header_is_the_whole_blob() -> None:
    rng = parse_range(None, 100)
    assert (rng.start, rng.stop, rng.is_whole) == (0, 100, True)


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [("bytes=10-", 10, 100), ("bytes=0-9", 0, 10), ("bytes=90-200", 90, 100),
     ("bytes=-10", 90, 100), ("bytes=-1000", 0, 100), ("BYTES = 5 - 6", 5, 7),
     ("bytes=0-", 0, 100), ("bytes=1-2,5-6", 0, 100)],
)
def test_ranges(header: str, start: int, stop: int) -> None:
    rng = parse_range(header, 100)
    assert (rng.start, rng.stop) == (start, stop)


def test_content_range() -> None:
    assert parse_range("bytes=10-", 100).content_range() == "bytes 10-99/100"


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=500-600", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 100)
    assert info.value.status == 416


@pytest.mark.parametrize(
    "header", ["bytes=", "bytes=-", "bytes=a-b", "items=0-1", "bytes=5-2", "0-1", "bytes=1-2-3",
               "bytes=" + "9" * 30 + "-"]
)
def test_malformed(header: str) -> None:
    with pytest.raises(RangeInvalid):
        parse_range(header, 100)


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 10_000))
def test_satisfiable_ranges_stay_inside_the_blob(a: int, b: int, size: int) -> None:
    start, end = min(a, b), max(a, b)
    try:
        rng = parse_range(f"bytes={start}-{end}", size)
    except RangeNotSatisfiable:
        assert start >= size
        return
    assert 0 <= rng.start < rng.stop <= size
    assert rng.length == min(end, size - 1) - start + 1


@given(st.text(max_size=60), st.integers(0, 1000))
def test_arbitrary_headers_give_a_range_or_a_request_error(header: str, size: int) -> None:
    try:
        rng = parse_range(header, size)
    except (RangeInvalid, RangeNotSatisfiable):
        return
    assert 0 <= rng.start <= rng.stop <= size
