"""LRU eviction between watermarks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.lru import LruPolicy


def test_evicts_least_recently_used_down_to_low_watermark() -> None:
    lru: LruPolicy[str] = LruPolicy(100, high=0.9, low=0.5)
    for key in "abcd":
        lru.add(key, 20)
    lru.touch("a")
    assert lru.choose_evictions() == []
    assert lru.choose_evictions(incoming=20) == ["b", "c", "d"]


def test_pinned_entries_are_never_chosen() -> None:
    lru: LruPolicy[str] = LruPolicy(100, high=0.5, low=0.1)
    lru.add("a", 30)
    lru.add("b", 30)
    lru.pin("a")
    assert lru.choose_evictions() == ["b"]
    lru.unpin("a")
    assert lru.choose_evictions() == ["a", "b"]


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 50)), max_size=60))
def test_evicting_the_choice_keeps_the_cache_under_the_high_mark(
    ops: list[tuple[int, int]],
) -> None:
    lru: LruPolicy[int] = LruPolicy(200, high=0.8, low=0.5)
    held: dict[int, int] = {}
    for key, size in ops:
        lru.add(key, size)
        held[key] = size
        victims = lru.choose_evictions()
        if victims:
            for victim in victims:
                lru.remove(victim)
                del held[victim]
            assert lru.total_bytes <= lru.low_bytes
        assert lru.total_bytes == sum(held.values())
        assert lru.total_bytes <= lru.high_bytes
    assert lru.statistics().entries == len(held)
