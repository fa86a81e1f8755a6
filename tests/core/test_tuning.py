"""The swarm's timings: waits between lookups are jittered around LOOKUP_INTERVAL."""

import random

from p2pd.core.tuning import LOOKUP_INTERVAL, LOOKUP_JITTER, lookup_wait


def test_lookup_waits_spread_evenly_around_the_interval() -> None:
    rng = random.Random(7)
    waits = [lookup_wait(rng) for _ in range(2000)]
    low, high = LOOKUP_INTERVAL * (1 - LOOKUP_JITTER), LOOKUP_INTERVAL * (1 + LOOKUP_JITTER)
    assert all(low <= w <= high for w in waits)
    assert abs(sum(waits) / len(waits) - LOOKUP_INTERVAL) < 0.02 * LOOKUP_INTERVAL
    quarter = (high - low) / 4
    assert min(waits) < low + quarter and max(waits) > high - quarter


def test_without_jitter_every_wait_is_the_interval() -> None:
    rng = random.Random(7)
    assert {lookup_wait(rng, 0.0) for _ in range(10)} == {LOOKUP_INTERVAL}
