"""A discrete-event engine: a virtual clock, a heap of timed callbacks, a seeded rng.

How it works: :meth:`Engine.schedule` pushes a timer, ordered by ``(time, seq)``, on a
heap; ``seq`` grows with every push, so callbacks due at the same time run in the order
they were scheduled and a seed plus the same calls always gives the same run. :meth:`Engine.run`
pops the earliest timer, moves the clock to its time and calls it. Cancelling a timer
only marks it (lazy deletion): the heap skips it when it comes up, which keeps
``cancel`` O(1) for the network model, which reschedules flow finish times constantly.
Callbacks due now (a zero delay: the nodes' "run my loop at this instant", the network's
batched recomputation) skip the heap: they wait in a FIFO and run in the same
``(time, seq)`` order the heap would give them, without its ``log n`` push and pop.

The heap is split by time (a calendar queue): a timer goes into the bucket of
:data:`BUCKET` seconds its time falls in, an unsorted list; a small heap holds the
numbers of the buckets that have timers. Only the earliest bucket is put in order, once,
when the clock reaches it: sorted by time, latest first, so that the next timer is
popped off its end. The order is the same ``(time, seq)`` order as one heap (every
timer of a bucket is earlier than every timer of a later one, and a bucket's timers
were appended in ``seq`` order, which the stable sort keeps among equal times), but it
costs one sort of a bucket's timers on their float times, not a heap: at 10,000 nodes
the single heap held a few hundred thousand timers and sifting through it, a cache miss
per level, took a third of the run, and a heap per bucket still compared timers
through ``Timer.__lt__`` a dozen times per event. A timer due within the bucket being
run goes into its place in it (found by bisection).

The cyclic garbage collector is off while :meth:`Engine.run` runs: a large run holds
millions of long-lived objects (schedulers, flows, timers) and allocates millions of
short-lived ones, and each full collection rescans them all — half the wall time at
10,000 nodes. The simulation leaves no reference cycles behind (flows drop their
callbacks when they end; a test checks a whole run), so reference counting frees it all.
"""

from __future__ import annotations

import bisect
import gc
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

Callback = Callable[[], None]

BUCKET: Final = 1e-4
"""Seconds of virtual time per bucket of the calendar queue (see the module docstring)."""


def _nothing() -> None:
    pass


class Timer:
    """A scheduled callback; :meth:`cancel` stops it from running. Timers run in
    ``(time, seq)`` order.

    A subclass can be its own event: it overrides :meth:`run` and is scheduled with
    :meth:`Engine.add` (one object per event, not a timer and a callback)."""

    __slots__ = ("callback", "cancelled", "seq", "time")

    def __init__(self, time: float, callback: Callback = _nothing) -> None:
        self.time = time
        self.seq = 0  # set when scheduled
        self.callback = callback
        self.cancelled = False

    def run(self) -> None:
        """What the timer does when due: call its callback."""
        self.callback()

    def cancel(self) -> None:
        """Do not run it (harmless if it already ran)."""
        self.cancelled = True


def _time(timer: Timer) -> float:
    return timer.time


def _later(timer: Timer) -> float:
    """The sort key of a bucket in order (latest first), for :func:`bisect.bisect_left`."""
    return -timer.time


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """Events run and cancelled so far, and what is still queued (cancelled included)."""

    events: int
    cancelled: int
    queued: int
    now: float


class Engine:
    """The virtual clock and event heap of one simulation run, seeded by ``seed``."""

    def __init__(self, seed: int) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self._heap: list[Timer] = []  # the earliest bucket's timers, the next one last
        self._heap_key = -1  # its number (timers up to it go into ``_heap``)
        self._buckets: dict[int, list[Timer]] = {}  # later timers, by bucket number
        self._keys: list[int] = []  # the numbers of ``_buckets`` (a heap)
        self._due: deque[Timer] = deque()  # all due at ``now``, in ``seq`` order
        self._seq = 0
        self._events = 0
        self._cancelled = 0
        self._stopped = False

    def schedule(self, delay: float, callback: Callback) -> Timer:
        """Run ``callback`` ``delay`` seconds from now (``delay >= 0``)."""
        if not delay >= 0:  # also rejects NaN
            raise ValueError(f"cannot schedule {delay!r} seconds from now")
        return self.schedule_at(self.now + delay, callback)

    def schedule_at(self, time: float, callback: Callback) -> Timer:
        """Run ``callback`` at virtual ``time`` (not before now)."""
        return self.add(Timer(time, callback))

    def add(self, timer: Timer) -> Timer:
        """Run ``timer`` at its time (not before now); it is scheduled now, so among
        timers due at the same time it runs after those scheduled before it."""
        now, time = self.now, timer.time
        if not time >= now:
            raise ValueError(f"cannot schedule at {time!r}, before now ({now})")
        self._seq += 1
        timer.seq = self._seq
        if time == now:
            self._due.append(timer)
            return timer
        key = int(time / BUCKET)
        if key <= self._heap_key:  # after the timers due no later (``seq`` is the largest)
            heap = self._heap
            heap.insert(bisect.bisect_left(heap, -time, key=_later), timer)
            return timer
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [timer]
            heapq.heappush(self._keys, key)
        else:
            bucket.append(timer)
        return timer

    def _refill(self) -> None:
        """The heap is empty: the earliest bucket becomes the heap."""
        key = heapq.heappop(self._keys)
        heap = self._heap = self._buckets.pop(key)
        heap.reverse()  # latest first, and among equal times the latest scheduled first
        heap.sort(key=_time, reverse=True)  # (stable: equal times keep that order)
        self._heap_key = key

    def child_rng(self) -> random.Random:
        """A new rng seeded from this engine's: one per component, still reproducible."""
        return random.Random(self.rng.getrandbits(64))

    def run(self, until: float | None = None, *, before: bool = False) -> float:
        """Run events in time order until none are left, the next is after ``until`` (at
        or after it, if ``before``) or :meth:`stop` is called; returns the clock
        (``until`` if it stopped there)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(until, before)
        finally:
            if collecting:
                gc.enable()

    def next_time(self) -> float:
        """No event is due before this time (infinite: none is queued)."""
        if self._due:
            return self.now
        if self._heap:
            return self._heap[-1].time
        if self._keys:
            return min(timer.time for timer in self._buckets[self._keys[0]])
        return math.inf

    def _run(self, until: float | None, before: bool) -> float:
        due, self._stopped = self._due, False
        popleft = due.popleft
        limit = math.inf if until is None else until
        if before:
            limit = math.nextafter(limit, -math.inf)
        while not self._stopped:
            heap = self._heap
            if not heap and self._keys:
                self._refill()
                heap = self._heap
            if due and not (heap and heap[-1].time == self.now and heap[-1].seq < due[0].seq):
                timer = popleft()
            elif heap:
                if heap[-1].time > limit:
                    self.now = limit
                    return limit
                timer = heap.pop()
                self.now = timer.time
            else:
                break
            if timer.cancelled:
                self._cancelled += 1
                continue
            self._events += 1
            timer.run()
        if until is not None and not self._stopped:
            self.now = max(self.now, until)
        return self.now

    @property
    def events(self) -> int:
        """Events run so far."""
        return self._events

    def stop(self) -> None:
        """Make :meth:`run` return after the current callback (queued events stay)."""
        self._stopped = True

    def statistics(self) -> EngineStatistics:
        """Counts of events so far."""
        queued = len(self._heap) + len(self._due) + sum(map(len, self._buckets.values()))
        return EngineStatistics(self._events, self._cancelled, queued, self.now)
