"""The swarm's timings: waits between lookups are jittered around LOOKUP_INTERVAL and
longer after a slow answer."""

import random

from p2pd.core.tuning import (
    LOOKUP_BACKOFF,
    LOOKUP_BACKOFF_MAX,
    LOOKUP_INTERVAL,
    LOOKUP_JITTER,
    lookup_wait,
)


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



def test_a_slow_answer_makes_the_next_lookup_wait_longer() -> None:
    # a coordinator that keeps up (answers in 2 ms): the same jittered waits as before
    assert [lookup_wait(random.Random(seed), answered_in=0.002) for seed in range(50)] == \
        [lookup_wait(random.Random(seed)) for seed in range(50)]
    # a queue at the coordinator (0.2 s to answer): LOOKUP_BACKOFF times that
    assert lookup_wait(random.Random(7), answered_in=0.2) == LOOKUP_BACKOFF * 0.2 > 0.5
    # never more than LOOKUP_BACKOFF_MAX for backing off
    assert lookup_wait(random.Random(7), answered_in=60.0) == LOOKUP_BACKOFF_MAX
    # the rng is drawn either way, so what follows is the same
    slow, fast = random.Random(7), random.Random(7)
    lookup_wait(slow, answered_in=0.2)
    lookup_wait(fast)
    assert slow.random() == fast.random()
