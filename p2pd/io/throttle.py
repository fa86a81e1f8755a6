"""Bandwidth limits for trio tasks, over :class:`p2pd.core.ratelimit.TokenBucket`."""

from __future__ import annotations

import trio

from p2pd.core.ratelimit import TokenBucket


class Throttle:
    """A shared byte rate: every user's bytes count against one bucket.

    ``Throttle(None)`` is no limit at all (and costs nothing).
    """

    def __init__(self, rate: float | None) -> None:
        self._bucket = TokenBucket(rate) if rate else None

    @property
    def rate(self) -> float | None:
        """Bytes per second, or ``None``."""
        return self._bucket.rate if self._bucket else None

    async def moved(self, n: int) -> None:
        """``n`` bytes just moved: wait as long as the rate asks."""
        if self._bucket is None:
            return
        delay = self._bucket.take(n, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)
