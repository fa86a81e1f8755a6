"""p2pd.core.draws: the same draws as random.Random's own methods."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.core.draws import sample, shuffle


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 400), st.data())
def test_sample_picks_what_random_sample_picks(seed: int, n: int, data: st.DataObject) -> None:
    """The same items, in the same order, leaving the rng in the same state: small
    populations (copied and shuffled in part) and large ones (positions drawn)."""
    k = data.draw(st.integers(0, n))
    population = [f"node{i}" for i in range(n)]
    ours, theirs = random.Random(seed), random.Random(seed)
    assert sample(ours, population, k) == theirs.sample(population, k)
    assert ours.getstate() == theirs.getstate()


def test_sample_refuses_more_than_the_population() -> None:
    with pytest.raises(ValueError):
        sample(random.Random(0), ["a", "b"], 3)
    with pytest.raises(ValueError):
        sample(random.Random(0), ["a", "b"], -1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 300))
def test_shuffle_orders_as_random_shuffle_does(seed: int, n: int) -> None:
    ours, theirs = list(range(n)), list(range(n))
    a, b = random.Random(seed), random.Random(seed)
    shuffle(a, ours)
    b.shuffle(theirs)
    assert ours == theirs
    assert a.getstate() == b.getstate()
