"""Which cached blobs to evict: least recently used first, between two watermarks.

How it works: every blob in the cache is an entry with its size. Using an entry moves
it to the most-recent end. When the total passes the high watermark, entries are evicted
from the least-recent end until the total is at or below the low watermark. Pinned
entries (blobs being written or served) are skipped, never evicted. The two watermarks
make eviction happen in batches instead of on every write.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class LruStatistics:
    """A snapshot of the cache accounting."""

    entries: int
    total_bytes: int
    capacity: int
    high_bytes: int
    low_bytes: int
    pinned: int


class LruPolicy(Generic[K]):
    """Byte-weighted LRU accounting with high/low watermarks (fractions of capacity)."""

    def __init__(self, capacity: int, *, high: float = 0.90, low: float = 0.75) -> None:
        if capacity <= 0:
            raise ValueError("cache capacity must be positive")
        if not 0 < low <= high <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        self.capacity = capacity
        self.high_bytes = int(capacity * high)
        self.low_bytes = int(capacity * low)
        self._sizes: OrderedDict[K, int] = OrderedDict()
        self._pins: Counter[K] = Counter()
        self.total_bytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, key: K, size: int) -> None:
        """Account a new entry (or replace one) as the most recently used."""
        self.remove(key)
        self._sizes[key] = size
        self.total_bytes += size

    def touch(self, key: K) -> None:
        """Mark ``key`` as just used."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def remove(self, key: K) -> None:
        """Forget ``key`` (no-op if absent)."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total_bytes -= size

    def pin(self, key: K) -> None:
        """Protect ``key`` from eviction until a matching :meth:`unpin`."""
        self._pins[key] += 1

    def unpin(self, key: K) -> None:
        """Release one :meth:`pin` of ``key``."""
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def is_pinned(self, key: K) -> bool:
        """Whether ``key`` is protected from eviction."""
        return key in self._pins

    def over_high_watermark(self, incoming: int = 0) -> bool:
        """Whether the cache, plus ``incoming`` bytes about to be written, passes the high mark."""
        return self.total_bytes + incoming > self.high_bytes

    def choose_evictions(self, incoming: int = 0) -> list[K]:
        """Entries to evict, oldest first, so that ``total + incoming`` falls to the low mark.

        Returns nothing while under the high watermark. The caller removes the entries
        (and calls :meth:`remove`); pinned entries are never chosen, so the result may
        fall short of the low mark.
        """
        if not self.over_high_watermark(incoming):
            return []
        excess = self.total_bytes + incoming - self.low_bytes
        chosen: list[K] = []
        for key, size in self._sizes.items():
            if excess <= 0:
                break
            if key in self._pins:
                continue
            chosen.append(key)
            excess -= size
        return chosen

    def statistics(self) -> LruStatistics:
        """The current accounting."""
        return LruStatistics(
            entries=len(self._sizes),
            total_bytes=self.total_bytes,
            capacity=self.capacity,
            high_bytes=self.high_bytes,
            low_bytes=self.low_bytes,
            pinned=len(self._pins),
        )
