"""Token buckets: how long to wait before moving ``n`` more bytes at a given rate.

The bucket fills at ``rate`` bytes per second up to ``burst`` bytes. Taking ``n`` bytes
may drive it negative; the caller then waits until it would be back at zero. Waiting
after the fact (rather than before) lets a transfer use whole reads and writes and
still average out to the rate.
"""

from __future__ import annotations


class TokenBucket:
    """A token bucket with time passed in (seconds, any monotonic origin)."""

    def __init__(self, rate: float, *, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 10, 64 * 1024)
        self._tokens = self.burst
        self._last: float | None = None

    def take(self, n: int, now: float) -> float:
        """Account ``n`` bytes moved at ``now``; return how long to wait before more."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)
