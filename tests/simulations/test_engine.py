"""The event engine: time order, ties in scheduling order, cancel, until, stop."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.engine import Engine, Timer


def test_events_run_in_time_then_schedule_order() -> None:
    engine = Engine(seed=1)
    seen: list[tuple[float, str]] = []
    engine.schedule(2.0, lambda: seen.append((engine.now, "c")))
    engine.schedule(1.0, lambda: seen.append((engine.now, "a")))
    engine.schedule(1.0, lambda: seen.append((engine.now, "b")))
    assert engine.run() == 2.0
    assert seen == [(1.0, "a"), (1.0, "b"), (2.0, "c")]


def test_callbacks_can_schedule_and_cancel() -> None:
    engine = Engine(seed=1)
    seen: list[float] = []
    late = engine.schedule(5.0, lambda: seen.append(-1.0))

    def first() -> None:
        seen.append(engine.now)
        late.cancel()
        engine.schedule(0.5, lambda: seen.append(engine.now))

    engine.schedule(1.0, first)
    engine.run()
    assert seen == [1.0, 1.5]
    assert engine.statistics().cancelled == 1


def test_run_until_stops_the_clock_there_and_resumes() -> None:
    engine = Engine(seed=1)
    seen: list[float] = []
    for t in (1.0, 3.0):
        engine.schedule(t, lambda: seen.append(engine.now))
    assert engine.run(until=2.0) == 2.0
    assert seen == [1.0]
    engine.run()
    assert seen == [1.0, 3.0]


def test_stop_ends_run_after_the_current_callback() -> None:
    engine = Engine(seed=1)
    engine.schedule(1.0, engine.stop)
    engine.schedule(2.0, lambda: None)
    assert engine.run() == 1.0
    assert engine.statistics().queued == 1


def test_rejects_the_past() -> None:
    engine = Engine(seed=1)
    with pytest.raises(ValueError):
        engine.schedule(-1.0, lambda: None)
    with pytest.raises(ValueError):
        engine.schedule(float("nan"), lambda: None)


def test_same_seed_same_random_streams() -> None:
    a, b = Engine(seed=7), Engine(seed=7)
    assert [a.child_rng().random() for _ in range(3)] == [b.child_rng().random() for _ in range(3)]
    assert Engine(seed=8).child_rng().random() != Engine(seed=7).child_rng().random()


def test_callbacks_due_now_keep_the_heaps_order() -> None:
    # A zero delay skips the heap, yet runs after what was scheduled earlier for the same
    # instant (with a delay) and before what is scheduled after it.
    engine = Engine(seed=1)
    seen: list[str] = []

    def at_one() -> None:
        seen.append("a")
        engine.schedule(0.0, lambda: seen.append("c"))
        engine.schedule(0.0, lambda: engine.schedule(0.0, lambda: seen.append("e")))
        engine.schedule_at(1.0, lambda: seen.append("d"))

    engine.schedule(1.0, at_one)
    engine.schedule(1.0, lambda: seen.append("b"))
    engine.schedule(0.0, lambda: seen.append("0"))
    cancelled = engine.schedule(0.0, lambda: seen.append("never"))
    cancelled.cancel()
    assert engine.run() == 1.0
    assert seen == ["0", "a", "b", "c", "d", "e"]
    assert engine.statistics().cancelled == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.005, allow_nan=False), st.integers(0, 3)),
                min_size=1, max_size=60),
       st.lists(st.floats(0, 0.006, allow_nan=False), max_size=4))
def test_the_calendar_queue_runs_everything_in_time_then_schedule_order(
    plan: list[tuple[float, int]], pauses: list[float]
) -> None:
    """Timers spread over many buckets, some scheduling more (into the current bucket,
    an earlier one after a pause at ``until``, or later ones): the run order is exactly
    ``(time, when scheduled)``, as one heap would give it."""
    engine = Engine(seed=1)
    ran: list[tuple[float, int]] = []
    order = iter(range(10**6))

    def timer(at: float, children: int) -> None:
        key = next(order)

        def fire() -> None:
            ran.append((engine.now, key))
            for k in range(children):  # later timers, near and far, and one due now
                timer(engine.now + (0.0, 1e-5, 3e-4, 0.002)[k], 0)

        engine.schedule_at(at, fire)
        expected.append((at, key))

    expected: list[tuple[float, int]] = []
    for delay, children in plan:
        timer(delay, children)
    for until in sorted(pauses):  # stop at an instant, schedule, go on
        engine.run(until)
        timer(engine.now + 1e-6, 1)
    engine.run()
    assert ran == sorted(expected)
    assert engine.statistics().queued == 0


def test_a_timer_due_within_the_running_bucket_takes_its_place_in_it() -> None:
    """Scheduled while its bucket runs, a timer runs after those due no later than it
    (those due at the same time were scheduled first) and before the later ones."""
    engine = Engine(seed=1)
    seen: list[str] = []

    def first() -> None:
        seen.append("first")
        engine.schedule_at(1.00002, lambda: seen.append("new"))

    engine.schedule_at(1.00005, lambda: seen.append("later"))
    engine.schedule_at(1.00002, lambda: seen.append("same 1"))
    engine.schedule_at(1.0, first)
    engine.schedule_at(1.00002, lambda: seen.append("same 2"))
    engine.schedule_at(1.00001, lambda: seen.append("earlier"))
    engine.run()
    assert seen == ["first", "earlier", "same 1", "same 2", "new", "later"]


class _Mark(Timer):
    """A timer that is its own event: it records its name and the clock."""

    __slots__ = ("name", "seen")

    def __init__(self, time: float, name: str, seen: list[tuple[float, str]]) -> None:
        super().__init__(time)
        self.name, self.seen = name, seen

    def run(self) -> None:
        self.seen.append((self.time, self.name))


def test_a_timer_subclass_is_its_own_event_in_the_same_order() -> None:
    engine = Engine(seed=1)
    seen: list[tuple[float, str]] = []
    engine.schedule_at(1.0, lambda: seen.append((engine.now, "plain 1")))
    first = engine.add(_Mark(1.0, "own 1", seen))
    engine.add(_Mark(0.5, "own 0.5", seen))
    engine.schedule_at(1.0, lambda: seen.append((engine.now, "plain 2")))
    engine.add(_Mark(1.0, "own 2", seen)).cancel()

    def now() -> None:  # due at once: after what was scheduled for this instant before
        engine.add(_Mark(engine.now, "own now", seen))
        engine.add(_Mark(engine.now + 1e-5, "own soon", seen))  # within the running bucket

    engine.schedule_at(1.0, now)
    engine.run()
    assert first.seq > 0
    assert seen == [(0.5, "own 0.5"), (1.0, "plain 1"), (1.0, "own 1"), (1.0, "plain 2"),
                    (1.0, "own now"), (1.0 + 1e-5, "own soon")]
    with pytest.raises(ValueError):
        engine.add(_Mark(0.5, "past", seen))
