"""Token buckets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.ratelimit import TokenBucket


def test_a_burst_passes_then_the_rate_holds() -> None:
    bucket = TokenBucket(1000, burst=500)
    assert bucket.take(500, 0.0) == 0.0
    assert bucket.take(1000, 0.0) == pytest.approx(1.0)


@given(st.lists(st.integers(1, 100_000), min_size=1, max_size=50),
       st.floats(100.0, 1e7))
def test_following_the_waits_never_beats_the_rate(sizes: list[int], rate: float) -> None:
    bucket = TokenBucket(rate)
    now = 0.0
    for size in sizes:
        now += bucket.take(size, now)
    # Everything moved by `now`, at most the burst beyond what the rate allows.
    assert sum(sizes) <= rate * now + bucket.burst + 1e-6 * sum(sizes)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
