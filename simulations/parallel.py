"""A run split between processes: each partition's nodes on their own core.

How it works. ``Scenario.partitions`` deals the nodes out to P partitions (node i to
partition i mod P: the nodes that start first, or ask a coordinator first, are spread
over all of them, so each has as much to do); each is a
:class:`~simulations.cluster.Cluster` of its own, with its own engine (every node and
host exists in each, but only the partition's own act). The registry is partition 0's.
Whatever one node does to another partition's node travels as a message
(``Cluster.post``): piece requests, refusals, pieces, coordinator calls and their
answers (a lookup's as what a download reads of it), crashes. A window's messages to a
partition cross as numbers (:class:`~simulations.cluster.Box`: requests, pieces and
refusals as two arrays' bytes, read when they come due; the rest as their method and
arguments). Every message is due at least one *window* after it was sent, the shortest
latency between two hosts (node to node, node to registry: twice the scenario's
``latency``), so the partitions run a window at a time, side by side (a conservative
parallel simulation): each runs its events due before the window's end, then they
exchange what they sent, which is due at the end or later (each sends and receives at
once, over non-blocking sockets). Windows where nothing is due are skipped. With
``P2PD_SIM_TIMINGS=1`` each process tells, at the end, how its time went (running its
events, waiting for the others, taking theirs in).

What changes against an unpartitioned run (the model, not only its speed):

- A flow is its sender's partition's. A host's downlink is split into one share per
  partition, each partition's flows sharing its share max-min fairly among themselves,
  and the shares are sized at the end of every window from what each partition's flows
  did in it (:func:`simulations.network.size_share`): a partition's flows find less
  room one window late, as TCP's flows find their share over round trips (those that
  carry more than the smaller share slow down, the fastest first, none speeding up),
  and more room at the next change of flows on that downlink or their uplinks
  (``Network.reshare``).
- A coordinator queues every call when it arrives, as the daemon's does (unpartitioned,
  the simulation takes send order: the same but for the coordinator's node's own
  calls); calls arriving at the same instant, by when they were sent, then by the
  caller's place in the cluster (``SimNode.rpc``), whichever partition they come from.
  A call is told to its target when sent (or, from another partition, when the window
  is delivered), and one event per instant takes that instant's calls in.
- Crashes reach the other partitions one window later.
- Same-instant events from different partitions run in a fixed order (time, sender,
  sequence), so a run is reproducible for a given seed and number of partitions, but
  not the same as with another number.

Rolling updates, shared unpacking cores and exact rates are not partitioned (they need
a view of the whole cluster at every instant).

:func:`run_partitioned` runs the partitions in forked processes that exchange their
messages through pipes, or, with ``processes=False``, one after the other in this
process (the same windows and messages: the same result, bit for bit; a test checks).
"""

from __future__ import annotations

import copyreg
import gc
import marshal
import math
import multiprocessing
import os
import select
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from multiprocessing.connection import Connection

from simulations.cluster import (
    PROGRESS_EVERY,
    Box,
    Cluster,
    Progress,
    Result,
    Scenario,
    Tally,
    Wire,
    result_of,
)
from simulations.network import NetworkStatistics

# The tallies cross between processes at the end. Compiled (mypyc), frozen dataclasses
# cannot be rebuilt by pickle's default (it sets their fields one by one).
for _kind in (NetworkStatistics, Tally):
    copyreg.pickle(_kind, partial(lambda kind, obj: (kind, tuple(
        getattr(obj, f.name) for f in fields(kind))), _kind))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one partition sends the others at the end of a window."""

    messages: list[Wire]  # by target partition
    shares: bytes  # its flows' count at the downlinks where it changed (Network.share_reports)
    next_time: float  # its own next event or message, whichever is due first
    left: int  # its nodes not done yet
    events: int


class _Partition:
    """One partition's cluster and its side of the window protocol."""

    def __init__(self, scenario: Scenario, part: int) -> None:
        self.cluster = Cluster(scenario, part)
        self.parts = scenario.partitions
        self.cluster.begin()

    def advance(self, until: float) -> Outgoing:
        """Run the events due before ``until``; what to send the others."""
        cluster = self.cluster
        cluster.engine.run(until, before=True)
        by_part, cluster.outbox = cluster.outbox, [Box() for _ in range(self.parts)]
        soonest, cluster.soonest_post = cluster.soonest_post, math.inf
        return Outgoing([box.wire() for box in by_part],
                        array("q", cluster.network.share_reports()).tobytes(),
                        min(cluster.engine.next_time(), soonest), cluster.left,
                        cluster.engine.events)

    def absorb(self, outgoing: list[Outgoing], until: float) -> None:
        """Take the window's messages and downlink reports from every partition."""
        cluster = self.cluster
        cluster.deliver([out.messages[cluster.part] for out in outgoing])
        cluster.network.reshare([_ints(out.shares) for out in outgoing], until)
        cluster.finished = sum(out.left for out in outgoing) == 0


def _ints(wired: bytes) -> list[int]:
    """The ints of an array's bytes (``array("q", ...).tobytes()``)."""
    ints = array("q")
    ints.frombytes(wired)
    return ints.tolist()


def _next_window(outgoing: list[Outgoing], until: float, window: float) -> float:
    """The end of the next window with something due in it (infinite: none)."""
    soonest = min(out.next_time for out in outgoing)
    if soonest == math.inf:
        return math.inf
    return max(until + window, (math.floor(soonest / window) + 1) * window)


def _report(progress: Callable[[Progress], None] | None, outgoing: list[Outgoing],
            until: float, scenario: Scenario, began: float, told: list[float],
            final: bool) -> None:
    if progress is None:
        return
    wall = time.perf_counter()
    if final or wall - told[0] >= PROGRESS_EVERY:
        told[0] = wall
        live = scenario.nodes - scenario.failures
        left = sum(out.left for out in outgoing)
        progress(Progress(simulated=until, done=live - left, live=live,
                          events=sum(out.events for out in outgoing), wall=wall - began))


def _run_serial(scenario: Scenario, progress: Callable[[Progress], None] | None,
                began: float) -> list[Tally]:
    parts = [_Partition(scenario, p) for p in range(scenario.partitions)]
    window = parts[0].cluster.window
    until, told = window, [began]
    while True:
        outgoing = [p.advance(until) for p in parts]
        for p in parts:
            p.absorb(outgoing, until)
        following = _next_window(outgoing, until, window)
        _report(progress, outgoing, until, scenario, began, told, following == math.inf)
        if following == math.inf:
            return [p.cluster.tally() for p in parts]
        until = following


def _worker(scenario: Scenario, part: int, links: list[Connection | None],
            back: Connection, report: bool, others: list[Connection]) -> None:
    """One partition's process: the window protocol over sockets to the others."""
    for end in others:  # the other processes' ends: a dead peer is then an EOFError
        end.close()
    fds = {other: link.fileno() for other, link in enumerate(links) if link is not None}
    buffers = {fd: bytearray() for fd in fds.values()}
    for fd in fds.values():
        os.set_blocking(fd, False)
    partition = _Partition(scenario, part)
    window = partition.cluster.window
    until, began = window, time.perf_counter()
    told = began
    spent = [0.0, 0.0, 0.0]  # running our events, exchanging, taking theirs in
    sent = 0
    while True:
        t0 = time.perf_counter()
        mine = partition.advance(until)
        data = marshal.dumps((mine.messages, mine.shares, mine.next_time, mine.left,
                              mine.events))
        sent += len(data)
        t1 = time.perf_counter()
        received = _exchange(fds, data, buffers)
        outgoing = [mine if other == part else Outgoing(*marshal.loads(received[other]))
                    for other in range(len(links))]
        t2 = time.perf_counter()
        partition.absorb(outgoing, until)
        t3 = time.perf_counter()
        spent[0], spent[1], spent[2] = spent[0] + t1 - t0, spent[1] + t2 - t1, \
            spent[2] + t3 - t2
        following = _next_window(outgoing, until, window)
        if following == math.inf and os.environ.get("P2PD_SIM_TIMINGS"):
            print(f"partition {part}: {spent[0]:.1f} s running its events, {spent[1]:.1f} s "
                  f"waiting for and reading the others' ({sent / 1e6:.0f} MB sent), "
                  f"{spent[2]:.1f} s taking them in; {partition.cluster.engine.events} "
                  f"events", file=sys.stderr, flush=True)
        if report and time.perf_counter() - told >= PROGRESS_EVERY:
            told = time.perf_counter()
            back.send(("progress", until, sum(o.left for o in outgoing),
                       sum(o.events for o in outgoing)))
        if following == math.inf:
            back.send(("done", partition.cluster.tally()))
            return
        until = following


def _exchange(fds: dict[int, int], data: bytes,
              buffers: dict[int, bytearray]) -> dict[int, bytes]:
    """Send ``data`` to every other partition (``fds``: its socket, non-blocking) and
    receive theirs, both at once: neither waits for the other to have read before it
    sends (a window's messages can be more than a socket's buffer holds). A frame is
    its length (8 bytes, little-endian), then the bytes. ``buffers``: what was read
    from each socket beyond its last frame (the start of the next window's)."""
    frame = memoryview(len(data).to_bytes(8, "little") + data)
    unsent = {fd: frame for fd in fds.values()}
    received: dict[int, bytes] = {}
    by_fd = {fd: other for other, fd in fds.items()}

    def take(fd: int) -> None:
        buffer = buffers[fd]
        if len(buffer) >= 8:
            end = 8 + int.from_bytes(buffer[:8], "little")
            if len(buffer) >= end:
                received[by_fd[fd]] = bytes(buffer[8:end])
                del buffer[:end]

    for fd in by_fd:
        take(fd)
    while unsent or len(received) < len(fds):
        readable, writable, _ = select.select(
            [fd for fd in by_fd if by_fd[fd] not in received], list(unsent), [])
        for fd in writable:
            try:
                left = unsent[fd][os.write(fd, unsent[fd]):]
            except BlockingIOError:
                continue
            if left:
                unsent[fd] = left
            else:
                del unsent[fd]
        for fd in readable:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("a partition's process is gone")
            buffers[fd] += chunk
            take(fd)
    return received


def _run_processes(scenario: Scenario, progress: Callable[[Progress], None] | None,
                   began: float) -> list[Tally]:
    context = multiprocessing.get_context("fork")
    count = scenario.partitions
    pipes: dict[tuple[int, int], tuple[Connection, Connection]] = {
        (a, b): context.Pipe() for a in range(count) for b in range(a + 1, count)}

    def link(me: int, other: int) -> Connection | None:
        if me == other:
            return None
        a, b = min(me, other), max(me, other)
        return pipes[a, b][0 if me == a else 1]

    backs = [context.Pipe(duplex=False) for _ in range(count)]
    ends = [end for pair in pipes.values() for end in pair] + [b for _, b in backs]
    workers = []
    for p in range(count):
        links = [link(p, q) for q in range(count)]
        others = [end for end in ends if end not in links and end is not backs[p][1]]
        workers.append(context.Process(target=_worker, args=(
            scenario, p, links, backs[p][1], p == 0 and progress is not None, others),
            daemon=True))
    for worker in workers:
        worker.start()
    for end in ends:  # ours: a dead worker is then an EOFError here
        end.close()
    tallies: list[Tally | None] = [None] * count
    try:
        for p, (receive, _) in enumerate(backs):
            while True:
                kind, *rest = receive.recv()
                if kind == "done":
                    tallies[p] = rest[0]
                    break
                assert progress is not None
                simulated, left, events = rest
                live = scenario.nodes - scenario.failures
                progress(Progress(simulated=simulated, done=live - left, live=live,
                                  events=events, wall=time.perf_counter() - began))
    except EOFError:
        raise RuntimeError("a partition's process died") from None
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    return [t for t in tallies if t is not None]


def run_partitioned(scenario: Scenario, progress: Callable[[Progress], None] | None = None,
                    *, processes: bool = True) -> Result:
    """Run ``scenario`` split into its ``partitions``: one forked process each, or one
    after the other in this process (``processes=False``); the same result either way."""
    if scenario.partitions < 2:
        raise ValueError("a partitioned run needs at least 2 partitions")
    began = time.perf_counter()
    run = _run_processes if processes else _run_serial
    collecting = gc.isenabled()
    gc.disable()  # between windows too (the engine turns it off only while it runs)
    try:
        tallies = run(scenario, progress, began)
    finally:
        if collecting:
            gc.enable()
    return result_of(scenario, tallies, time.perf_counter() - began)
