"""A flow-level network: hosts with upload/download capacity, transfers sharing it fairly.

How it works. Every host has two resources, its uplink and its downlink (bytes/s; the
registry is a host with a finite uplink, its egress, and an unlimited downlink). A
transfer is a *flow* from ``src`` to ``dst``: it uses ``src``'s uplink and ``dst``'s
downlink, and moves at a rate the model assigns. Packets, TCP dynamics and the core
network are not modelled: the access links are the bottleneck, as on a cluster whose
fabric is faster than its nodes' NICs and the registry's egress.

Rates are max-min fair, computed by *progressive filling*: all flows grow at the same
speed; when a resource is full its flows freeze at their share and the others go on.
Rates change only when a flow starts or ends. Then each flow's progress is brought up to
date and its new rate set. Finish times are rescheduled lazily: a flow that sped up gets
a new, earlier timer (the old one is cancelled); one that slowed down keeps its timer,
which on firing finds bytes left and re-arms for the real end (a flow joining a link
slows the others on it: those need no new timer until the old one comes up).

Which flows are recomputed (``exact=False``, the default): the flows on the resources
whose set of flows changed (the *region*: the uplink of the flow's source and the
downlink of its destination, for each flow that started or ended). Resources further out
keep the rates of their other flows frozen and offer the region only what those leave
free (``capacity - frozen rates``, kept as a running sum per resource), so capacity is
never oversubscribed. The cost per change is O(k + r²) for the k flows on the two
endpoints (bounded by upload slots and in-flight limits, ~100) and the r resources they
use (the filling scans them for the smallest share; above :data:`SCAN_LIMIT` it keeps a
heap), independent of the number of hosts and flows. The approximation: capacity freed
two hops away (a flow in the region slowed down, leaving room on its *other* end) is not
handed out until something changes on that resource — usually within one piece time in a
busy swarm.
A flow may be a connection that sends transfers one after another (``more``): when one
is sent, the next goes on at the same rate with no recomputation, since the links carry
the same flows as before.
Changes at one instant are batched: starts and ends mark resources dirty and one
recomputation runs after the other events of that instant (a zero-delay event).

``exact=True`` recomputes every flow on each change: exact max-min (O(F log F) per
change for F flows), for tests and for checking the local model on small runs.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

from simulations.engine import Engine, Timer

_INF: Final = math.inf
_EPSILON: Final = 1e-9  # relative: rates this close are taken as unchanged
_LEFTOVER: Final = 1e-9  # relative: a flow with less than this left at its timer is done


def _nothing() -> None:
    pass


More = Callable[[], "tuple[int, Callable[[], None]] | None"]
"""Asked when a flow's bytes are all sent: the size and ``on_done`` of the next transfer
queued on the same connection (``None``: the connection has nothing more to send)."""


class Resource:
    """One direction of a host's access link: a capacity and the flows through it."""

    __slots__ = ("avail", "capacity", "dirty", "flows", "full", "left", "members", "name", "number",
                 "share", "total")

    def __init__(self, name: str, capacity: float) -> None:
        if not capacity > 0:
            raise ValueError(f"capacity of {name} must be positive")
        self.name = name
        self.capacity = capacity
        # in the order they started (deterministic); a list, not a dict: a handful of
        # flows, added and removed at every start and end, need no hashing
        self.flows: list[Flow] = []
        self.total = 0.0  # sum of the rates of ``flows``
        self.dirty = False  # in Network._dirty
        # scratch for max_min_rates: its position there (-1 outside), the region's flows
        # through it, what it offers them, how many are not frozen yet, and their share
        self.number = -1
        self.full = capacity  # the link's capacity (a partition's share: ``capacity``)
        self.members: list[Flow] = []
        self.avail = 0.0
        self.left = 0
        self.share = 0.0


class Host:
    """A node or the registry: uplink, downlink and the one-way latency of its link."""

    __slots__ = ("counts", "down", "downs", "index", "latency", "name", "part", "reported",
                 "sharing", "up")

    def __init__(self, name: str, up: float, down: float, latency: float,
                 part: int = 0, parts: int = 1) -> None:
        if latency < 0:
            raise ValueError("latency cannot be negative")
        self.name = name
        self.index = 0  # its place among the network's hosts (Network.by_index)
        self.up = Resource(f"{name}/up", up)
        self.down = Resource(f"{name}/down", down)
        self.latency = latency
        self.part = part
        # partitioned (parts > 1, finite downlink): the downlink as one share per
        # partition of senders, sized at the end of every window (Network.reshare)
        self.downs = [self.down]
        if parts > 1 and down != _INF:
            self.downs += [Resource(f"{name}/down@{k}", down) for k in range(1, parts)]
        # and Network.share_reports' and reshare's book of them (kept here, not in dicts
        # by host, as they are read for every host reported in every window): the
        # partitions' flows here as last reported (empty: none yet), ours as last
        # reported, and whether ours changed since (in ``Network._shares``)
        self.counts: list[int] = []
        self.reported = 0
        self.sharing = False


class Flow:
    """A transfer of ``size`` bytes from ``src`` to ``dst`` (see the module docstring)."""

    __slots__ = ("counted", "delay", "done", "down", "dst", "fixed", "more", "net", "on_done",
                 "on_sent", "picked", "rate", "remaining", "since", "size", "src", "tag",
                 "timer")

    def __init__(self, src: Host, dst: Host, size: int, tag: str,
                 on_done: Callable[[], None], now: float) -> None:
        self.src, self.dst, self.size, self.tag, self.on_done = src, dst, size, tag, on_done
        # the downlink it uses: the destination's share for the source's partition
        self.down = dst.downs[src.part] if len(dst.downs) > 1 else dst.down
        self.delay = 0.0  # from its finish to its ``on_done``
        self.remaining = float(size)
        self.rate = 0.0
        self.since = now  # when ``remaining`` was last brought up to date
        self.timer: Timer | None = None
        self.done = False
        self.net: Network | None = None  # its network while it runs
        self.on_sent: Callable[[], None] | None = None
        self.more: More | None = None  # the next transfer on the same connection, if any
        self.counted = True  # in the statistics' bytes
        self.fixed = 0.0  # scratch for max_min_rates: its new rate (-1: not frozen yet)
        self.picked = 0  # the last recomputation that took it into its region


class _Finish(Timer):
    """``flow``'s finish timer, due at ``time`` (see ``Network._finish``): its own event."""

    __slots__ = ("flow",)

    def __init__(self, time: float, flow: Flow) -> None:
        super().__init__(time)
        self.flow = flow

    def run(self) -> None:
        flow = self.flow
        if flow.net is not None:
            flow.net._finish(flow)


class _Reflow(Timer):
    """The network's batched recomputation of rates, due at ``time``: its own event
    (not a timer and a bound method)."""

    __slots__ = ("net",)

    def __init__(self, time: float, net: Network) -> None:
        super().__init__(time)
        self.net = net

    def run(self) -> None:
        self.net._recompute()


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    """Bytes delivered by tag (``bytes_by_tag``), flows and recomputation work so far."""

    bytes_by_tag: dict[str, int]
    bytes_started: int
    bytes_wasted: int  # moved by flows that were cancelled
    flows_started: int
    flows_completed: int
    flows_cancelled: int
    active: int
    recomputes: int
    flows_recomputed: int


class Network:
    """The hosts of a run and the flows between them, on ``engine``'s clock."""

    def __init__(self, engine: Engine, *, exact: bool = False, parts: int = 1) -> None:
        self.engine = engine
        self.exact = exact
        self.parts = parts
        self.part = 0  # partitioned: the partition whose flows these are
        self._shares: list[Host] = []  # downlinks our flows changed on (Host.sharing)
        self._watched: dict[Resource, list[tuple[float, float]]] = {}
        self._sent: dict[Resource, float] = {}  # watched: bytes of flows that ended
        self.hosts: dict[str, Host] = {}
        self.by_index: list[Host] = []  # the hosts in the order added (Host.index)
        self._flows: dict[Flow, None] = {}  # exact only (the rest count ``_active``)
        self._active = 0
        self._serial = 0  # recomputations so far (Flow.picked)
        self._dirty: list[Resource] = []  # first touched first
        self._shrunk: dict[Resource, None] = {}  # shares now below their flows' rates
        self._reflow: Timer | None = None
        self._bytes: dict[str, int] = {}  # by tag (compiled, a Counter goes the generic way)
        self._started = self._wasted = 0
        self._counts = [0, 0, 0]  # started, completed, cancelled
        self._recomputes = self._recomputed = 0

    def add_host(self, name: str, *, up: float, down: float = math.inf,
                 latency: float = 0.0, part: int = 0) -> Host:
        """A new host with uplink ``up`` and downlink ``down`` bytes/s, in partition
        ``part`` (of ``parts``)."""
        if name in self.hosts:
            raise ValueError(f"host {name} exists")
        if not 0 <= part < self.parts:
            raise ValueError(f"partition {part} outside 0..{self.parts - 1}")
        host = self.hosts[name] = Host(name, up, down, latency, part, self.parts)
        host.index = len(self.by_index)
        self.by_index.append(host)
        return host

    def latency(self, src: Host, dst: Host) -> float:
        """One-way latency from ``src`` to ``dst`` (both access links; zero to itself)."""
        return 0.0 if src is dst else src.latency + dst.latency

    def transfer(self, src: Host, dst: Host, size: int, on_done: Callable[[], None], *,
                 tag: str, on_sent: Callable[[], None] | None = None,
                 counted: bool = True, more: More | None = None,
                 delay: float | None = None) -> Flow:
        """Start moving ``size`` bytes now; ``on_done`` runs when the last byte has
        arrived (finish time plus the one-way latency), ``on_sent`` when it has left (the
        finish time). ``tag`` labels the bytes; ``counted=False`` leaves them out of the
        statistics' bytes (work modelled as a flow, not traffic).

        ``more``: the flow is a connection that sends transfers one after another. When
        one is sent, ``more()`` gives the next one's size and ``on_done``, and the flow
        goes on with it at the same rate: the links carry the same flows as before, so no
        rate changes (a connection's next frame follows its last without a gap). Each
        transfer counts as a flow of its own in the statistics; ``on_sent`` runs after
        each.

        ``delay``: from the finish time to ``on_done``, if not the one-way latency (0: in
        a partitioned run, a flow to another partition's host, whose ``on_done`` posts
        the arrival there)."""
        if size <= 0:
            raise ValueError("a flow moves at least one byte")
        if math.isinf(src.up.capacity) and math.isinf(dst.down.full):
            raise ValueError("a flow needs a finite uplink or downlink")
        flow = Flow(src, dst, size, tag, on_done, self.engine.now)
        flow.net = self
        flow.on_sent = on_sent
        flow.more = more
        flow.counted = counted
        flow.delay = self.latency(src, dst) if delay is None else delay
        if self.exact:
            self._flows[flow] = None
        self._active += 1
        src.up.flows.append(flow)
        flow.down.flows.append(flow)
        if counted:
            self._started += size
        self._counts[0] += 1
        self._touch(flow)
        return flow

    def watch(self, host: Host) -> list[tuple[float, float]]:
        """Log what ``host`` sends over time: ``(time, bytes sent so far)`` whenever the
        rates of its flows change (the bytes grow linearly in between)."""
        log = self._watched[host.up] = [(self.engine.now, 0.0)]
        self._sent[host.up] = 0.0
        return log

    def cancel(self, flow: Flow) -> None:
        """Stop ``flow`` (its ``on_done`` never runs); the bytes moved count as wasted."""
        if flow.done:
            return
        self._progress(flow)
        if flow.counted:
            self._wasted += flow.size - max(0, math.ceil(flow.remaining))
        self._counts[2] += 1
        self._remove(flow)

    # -- internals ----------------------------------------------------------------------

    def _touch(self, flow: Flow) -> None:
        for resource in (flow.src.up, flow.down):
            if not resource.dirty:
                resource.dirty = True
                self._dirty.append(resource)
        if self._reflow is None:
            self._reflow = self.engine.add(_Reflow(self.engine.now, self))
        dst = flow.dst
        if len(dst.downs) > 1 and not dst.sharing:  # to be shared out again (share_reports)
            dst.sharing = True
            self._shares.append(dst)

    def share_reports(self) -> list[int]:
        """How many of this partition's flows go to each host where that changed since
        the last call: the host's index, then the count, for each (:func:`size_share`
        splits downlinks by these counts). Only where it tells the others something:
        where another partition sends too, or where we begin or cease to send (a
        partition alone at a downlink has all of it)."""
        shares, self._shares = self._shares, []
        reports: list[int] = []
        part = self.part
        for host in shares:
            host.sharing = False
            count = len(host.downs[part].flows)
            before = host.reported
            if count == before:
                continue
            if count and before:
                others = host.counts
                if not any(n for k, n in enumerate(others) if k != part):
                    continue  # alone there: ours whatever we do
            host.reported = count
            reports.append(host.index)
            reports.append(count)
        return reports

    def reshare(self, reports: list[list[int]], at: float) -> None:
        """Size this partition's shares of the downlinks in ``reports`` (every
        partition's, ours included, in partition order); at ``at``, slow down our flows
        through a share that shrank below what they carry. Reports not repeated since
        stand (nothing changed there).

        A share that grew is taken up at the next change of flows on that downlink or
        on its flows' uplinks (the local model's rule for capacity freed elsewhere; in a
        busy swarm within a piece's time), not at once: one partition's share grows as
        another's shrinks, and re-rating both at every window's end took 43 % of the
        time spent on rates (1,000 nodes: 768 k flows re-rated at windows' ends, against
        374 k for the shrunk ones alone). A shrunk share is taken up at once, so the
        partitions' flows never carry more than the link: its flows get max-min fair
        rates within it, none above the rate it had (:func:`_fitted_rates`; what that frees
        at their uplinks waits for the next change there, by the same rule)."""
        hosts, me, shares = self.by_index, self.part, self._shares
        changed: dict[Host, None] = {}
        for part, part_reports in enumerate(reports):
            for i in range(0, len(part_reports), 2):
                host = hosts[part_reports[i]]
                counts = host.counts
                if not counts:
                    counts = host.counts = [0] * self.parts
                counts[part] = part_reports[i + 1]
                changed[host] = None
                if part != me and host.downs[me].flows and not host.sharing:
                    host.sharing = True  # ours there: tell them next time
                    shares.append(host)
        for host in changed:
            resource = host.downs[me]
            size = size_share(host.counts, me, host.down.full)
            if abs(size - resource.capacity) > _RESIZE * resource.full:
                resource.capacity = size
                if resource.total > size * (1 + _EPSILON):
                    self._shrunk[resource] = None
        if (self._dirty or self._shrunk) and self._reflow is None:
            self._reflow = self.engine.add(_Reflow(at, self))

    def _remove(self, flow: Flow) -> None:
        flow.done = True
        if flow.src.up in self._sent:
            self._sent[flow.src.up] += flow.size - max(0.0, flow.remaining)
        if flow.timer is not None:
            flow.timer.cancel()
        # An ended flow lets go of its callbacks: they refer back to it (the finish timer,
        # the caller's closures), and without these cycles reference counting frees it
        # at once (the engine runs with the cyclic garbage collector off).
        flow.timer, flow.net, flow.on_done, flow.on_sent = None, None, _nothing, None
        flow.more = None
        if self.exact:
            del self._flows[flow]
        self._active -= 1
        for resource in (flow.src.up, flow.down):
            resource.flows.remove(flow)
            resource.total = resource.total - flow.rate if resource.flows else 0.0
        self._touch(flow)

    def _progress(self, flow: Flow) -> None:
        now = self.engine.now
        flow.remaining -= flow.rate * (now - flow.since)
        flow.since = now

    def _finish(self, flow: Flow) -> None:
        flow.timer = None
        self._progress(flow)
        now = self.engine.now
        if flow.remaining > _LEFTOVER * flow.size and flow.rate > 0:
            end = now + flow.remaining / flow.rate
            if end > now:
                # The flow slowed down after this timer was set (lazy rescheduling, see
                # _recompute): wake again when it really ends.
                flow.timer = self.engine.add(_Finish(end, flow))
                return
        if flow.counted:
            self._bytes[flow.tag] = self._bytes.get(flow.tag, 0) + flow.size
        self._counts[1] += 1
        on_sent, on_done = flow.on_sent, flow.on_done
        following = flow.more() if flow.more is not None else None
        if following is None:
            self._remove(flow)
        else:
            self._follow(flow, *following)
        if on_sent is not None:
            on_sent()
        delay = flow.delay
        if delay:
            self.engine.schedule(delay, on_done)
        else:
            on_done()

    def _follow(self, flow: Flow, size: int, on_done: Callable[[], None]) -> None:
        """``flow`` goes on with the next transfer of its connection, at its rate."""
        if size <= 0:
            raise ValueError("a flow moves at least one byte")
        if flow.src.up in self._sent:
            self._sent[flow.src.up] += flow.size
        flow.size, flow.remaining, flow.on_done = size, float(size), on_done
        if flow.counted:
            self._started += size
        self._counts[0] += 1
        flow.timer = self.engine.add(_Finish(self.engine.now + size / flow.rate, flow))

    def _recompute(self) -> None:
        self._reflow = None
        dirty, self._dirty = self._dirty, []
        if self._shrunk:
            shrunk, self._shrunk = self._shrunk, {}
            for resource in shrunk:
                if not resource.dirty:  # else re-rated below, with the rest
                    self._squeeze(resource)
        for resource in dirty:
            resource.dirty = False
        if self.exact:
            region = list(self._flows)
        else:  # each flow once, first seen first
            serial = self._serial = self._serial + 1
            region = []
            for resource in dirty:
                for flow in resource.flows:
                    if flow.picked != serial:
                        flow.picked = serial
                        region.append(flow)
        if not region:
            self._log_watched(dirty)
            return
        self._recomputes += 1
        self._recomputed += len(region)
        _fill_rates(region)
        engine = self.engine
        now = engine.now
        for flow in region:
            rate, old, timer = flow.fixed, flow.rate, flow.timer
            if timer is not None and abs(rate - old) <= _EPSILON * max(rate, old):
                continue  # same rate: the finish timer stands
            flow.remaining -= old * (now - flow.since)
            flow.since = now
            flow.rate = rate
            flow.src.up.total += rate - old
            flow.down.total += rate - old
            if rate > 0:
                end = now + max(flow.remaining, 0.0) / rate
                if timer is not None and timer.time <= end:
                    continue  # slower: the earlier timer stands and re-arms when it fires
                if timer is not None:
                    timer.cancel()
                flow.timer = engine.add(_Finish(end, flow))
            elif timer is not None:
                timer.cancel()
                flow.timer = None
        self._log_watched(dirty)

    def _squeeze(self, resource: Resource) -> None:
        """Bring the rates of ``resource``'s flows within its capacity (:func:`_fitted_rates`),
        each finish timer standing (a slower flow re-arms when it comes up)."""
        now, slowed = self.engine.now, _fitted_rates(resource)
        for flow, rate in slowed:
            old = flow.rate
            flow.remaining -= old * (now - flow.since)
            flow.since = now
            flow.rate = rate
            flow.src.up.total += rate - old
            resource.total += rate - old
        if slowed and self._watched:
            self._log_watched({flow.src.up: None for flow, _ in slowed})

    def _log_watched(self, dirty: Collection[Resource]) -> None:
        now = self.engine.now
        for resource, log in self._watched.items():
            if resource in dirty:
                moved = sum(f.size - f.remaining + f.rate * (now - f.since)
                            for f in resource.flows)
                log.append((now, self._sent[resource] + moved))

    def statistics(self) -> NetworkStatistics:
        """Bytes and flow counts so far."""
        return NetworkStatistics(
            bytes_by_tag=dict(sorted(self._bytes.items())), bytes_started=self._started,
            bytes_wasted=self._wasted, flows_started=self._counts[0],
            flows_completed=self._counts[1], flows_cancelled=self._counts[2],
            active=self._active, recomputes=self._recomputes,
            flows_recomputed=self._recomputed,
        )


SCAN_LIMIT = 64
"""Regions through at most this many resources are filled by scanning them for the
smallest share (no heap, no boxed floats: the scratch lives in the resources); larger
ones (``exact=True``) with a heap. Both give the same rates, bit for bit."""


def max_min_rates(region: list[Flow]) -> list[float]:
    """Max-min fair rates for ``region`` by progressive filling, with every flow outside
    it frozen at its current rate (each resource offers the region what they leave)."""
    _fill_rates(region)
    return [flow.fixed for flow in region]


def _fill_rates(region: list[Flow]) -> None:
    """:func:`max_min_rates`, left in each flow's ``fixed``."""
    seen: list[Resource] = []  # resources by position, first seen first (``number``)
    for flow in region:
        flow.fixed = -1.0
        _join(flow.src.up, flow, seen)
        _join(flow.down, flow, seen)
    for resource in seen:
        resource.share = max(resource.avail, 0.0) / resource.left
    if len(seen) > SCAN_LIMIT:
        _fill_by_heap(seen)
    else:
        _fill_by_scan(seen)
    for resource in seen:  # emptied, not replaced: no list made and freed per resource
        resource.number = -1
        resource.members.clear()
    for flow in region:
        if flow.fixed < 0:
            flow.fixed = 0.0


def _join(resource: Resource, flow: Flow, seen: list[Resource]) -> None:
    """``flow`` of the region goes through ``resource``: its rate is up for grabs there."""
    if resource.number < 0:
        resource.number = len(seen)
        seen.append(resource)
        resource.members.append(flow)  # (empty: left so by the last _fill_rates)
        resource.avail = resource.capacity - resource.total + flow.rate
        resource.left = 1
    else:
        resource.members.append(flow)
        resource.avail += flow.rate
        resource.left += 1


def _freeze(resource: Resource, share: float) -> None:
    """``resource`` is full: its unfrozen flows get ``share``; their other ends offer
    the rest less and share it among fewer."""
    resource.left = 0
    for flow in resource.members:
        if flow.fixed >= 0:
            continue
        flow.fixed = share
        other = flow.down if flow.src.up is resource else flow.src.up
        other.left -= 1
        other.avail -= share
        if other.left and other.avail != _INF:
            other.share = max(other.avail, 0.0) / other.left


def _fill_by_scan(seen: list[Resource]) -> None:
    # ties: first seen first, reproducibly; unlimited resources never freeze anything
    while True:
        best: Resource | None = None
        least = _INF
        for resource in seen:
            if resource.left and resource.share < least:
                best, least = resource, resource.share
        if best is None:
            return
        _freeze(best, least)


def _fill_by_heap(seen: list[Resource]) -> None:
    heap = [(r.share, k) for k, r in enumerate(seen) if r.share != _INF]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        share, k = pop(heap)
        resource = seen[k]
        if not resource.left or share != resource.share:
            continue  # stale entry: a fresher one was pushed when it changed
        changed = [flow.down if flow.src.up is resource else flow.src.up
                   for flow in resource.members if flow.fixed < 0]
        _freeze(resource, share)
        for other in changed:
            if other.left and other.share != _INF:
                push(heap, (other.share, other.number))


def _fitted_rates(resource: Resource) -> list[tuple[Flow, float]]:
    """New rates for the flows through ``resource`` whose rates add up to more than its
    capacity: max-min fair within it, none above its current rate (the flows that
    must slow down, with their rates; the others keep theirs)."""
    flows = sorted(resource.flows, key=_rate)  # ties: insertion order (a stable sort)
    left, count = resource.capacity, len(flows)
    for k, flow in enumerate(flows):
        share = left / (count - k)
        if flow.rate > share:
            return [(slowed, share) for slowed in flows[k:]]
        left -= flow.rate
    return []


def _rate(flow: Flow) -> float:
    return flow.rate


_LEAST: Final = 1e-3  # of the link: the smallest share a partition is given
_RESIZE: Final = 1e-3  # of the link: shares that move less are left as they are


def size_share(counts: list[int], part: int, capacity: float) -> float:
    """Partition ``part``'s share of a downlink of ``capacity``: the partitions' flows
    through it as last reported (``counts``) each get as much. A partition that has
    not reported a flow there yet has all of the link, for its first flows, until the
    next window (the shares may then add up to more than the link for a window).

    The parts follow the flows one window late, as TCP's flows find their share over
    round trips. A flow held back elsewhere (at its sender's uplink) leaves its part of
    the share to its partition's other flows there, not to the other partitions'."""
    mine = counts[part]
    total = sum(counts)
    if not mine or total == mine:
        return capacity
    return max(capacity * mine / total, capacity * _LEAST)
