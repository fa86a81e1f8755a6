"""Scenarios and runs: a cluster of :class:`~simulations.node.SimNode` and a registry.

A :class:`Scenario` fixes the cluster (nodes, their upload/download capacity and disk
throughput, link latency), the registry (egress capacity, time to answer a request), the
image (``layer_sizes``, or ``image_bytes`` cut into ``layers`` equal blobs), when nodes
start (``arrival``), which fail (``failures`` crash at ``fail_at``) and the daemon's own
:class:`~simulations.node.Limits`. :func:`run_p2p` runs p2pd; the baselines — every
node straight from the registry, and a Spegel-like mirror that shares only complete
layers — are in :mod:`simulations.baselines`. All return a :class:`Result`: per-node pull
times (each from its own start), when the last node was done, bytes by source, registry
egress over time and the Kumar-Ross lower bound.

Arrivals (:class:`Rollout`): ``all`` start at 0; ``rolling`` starts ``batch`` (a
fraction) of the nodes, and the next batch when every node of the previous one is done,
as a Deployment's rolling update with that ``maxUnavailable`` would; ``staggered``
starts one node every ``stagger`` seconds. Nodes start in a seeded random order.

Failures: ``failures`` nodes drawn at random crash at ``fail_at``; after ``detect``
seconds the others stop counting them as members (coordinators move, their holder
entries are forgotten). Crashed nodes are left out of the pull times.
"""

from __future__ import annotations

import gc
import hashlib
import math
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Final, cast

from p2pd.core.membership import Member, coordinator_for
from p2pd.core.pieces import PieceLayout
from simulations import hugepages
from simulations.compiled import in_use
from simulations.engine import Engine, Timer
from simulations.network import Flow, Host, Network, NetworkStatistics
from simulations.node import BlobSpec, Limits, SimNode

MiB = 1 << 20
ARRIVALS = ("all", "rolling", "staggered")


@dataclass(frozen=True, slots=True)
class Scenario:
    """What to simulate; capacities in bytes/s, latencies in seconds (one way, per
    access link: node to node is twice ``latency``)."""

    nodes: int
    image_bytes: int
    node_up: float
    node_down: float
    registry_up: float
    layers: int = 4
    latency: float = 0.0005
    registry_latency: float = 0.02
    seed: int = 0
    exact: bool = False  # exact max-min rates on every change (slow; for checking)
    limits: Limits = field(default_factory=Limits)
    layer_sizes: tuple[int, ...] = ()  # the layers; if given, image_bytes is their sum
    disk: float | None = None  # per-node disk throughput: caps its upload and download
    arrival: str = "all"
    batch: float = 0.1  # rolling: fraction of the nodes per batch
    stagger: float = 1.0  # staggered: seconds between starts
    failures: int = 0
    fail_at: float = 1.0
    detect: float = 2.0
    # containerd unpacks the image once every layer is in (``ctr images pull``; the
    # kubelet's CRI pull unpacks too): bytes/s of one node's unpacking, on one core.
    # None: not modelled, a node is done when it holds every layer.
    unpack: float | None = None
    # the nodes share this many cores for unpacking (the emulation's machine: one
    # host runs every node); None: each node unpacks on its own CPU.
    shared_cores: int | None = None
    # coordinators spend CPU on every lookup, lease request and announcement (one core,
    # first come first served; ``simulations.node.COORDINATOR_CPU``); False: they answer
    # at once, however many nodes ask
    coordinator_cpu: bool = True
    # the nodes split into this many partitions, each a process's share of the work:
    # a flow is the sender's partition's, and a downlink is shared between the
    # partitions' flows by what they did in the last window (node to node latency)
    partitions: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("need at least one node")
        if self.layer_sizes and sum(self.layer_sizes) != self.image_bytes:
            raise ValueError("image_bytes must be the sum of layer_sizes")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}")
        if not 0 < self.batch <= 1 or self.stagger < 0:
            raise ValueError("batch must be in (0, 1] and stagger not negative")
        if not 0 <= self.failures < self.nodes:
            raise ValueError("failures must leave at least one node")
        if self.unpack is not None and not self.unpack > 0:
            raise ValueError("unpack must be a positive rate")
        if self.shared_cores is not None and (self.unpack is None or self.shared_cores < 1):
            raise ValueError("shared_cores needs unpack and at least one core")
        if not 1 <= self.partitions <= self.nodes:
            raise ValueError("partitions must be between 1 and the number of nodes")
        if self.partitions > 1:
            if self.latency <= 0:
                raise ValueError("partitions need a latency: it is their window")
            if self.arrival == "rolling" or self.shared_cores is not None or self.exact:
                raise ValueError("partitions do not run rolling updates, shared cores "
                                 "or exact rates")

    def blobs(self) -> list[BlobSpec]:
        """The image's layers: ``layer_sizes``, or equal sizes with the remainder last."""
        if self.layer_sizes:
            sizes = list(self.layer_sizes)
        else:
            if self.layers < 1 or self.image_bytes < self.layers:
                raise ValueError("need at least one layer and one byte per layer")
            size, extra = divmod(self.image_bytes, self.layers)
            sizes = [size] * self.layers
            sizes[-1] += extra
        return [BlobSpec(sys.intern("sha256:" + hashlib.sha256(f"layer-{k}".encode()).hexdigest()),
                         n) for k, n in enumerate(sizes)]

    @property
    def up(self) -> float:
        """A node's upload capacity: its link, disk and the daemon's upload limit."""
        return min(self.node_up, self.disk or math.inf,
                   self.limits.upload_limit or math.inf)

    @property
    def down(self) -> float:
        """A node's download capacity: its link, disk and the daemon's download limit
        (which the daemon applies to peer bytes only; here to all)."""
        return min(self.node_down, self.disk or math.inf,
                   self.limits.download_limit or math.inf)


PROGRESS_STEP = 0.1
"""Simulated seconds between progress checks (``Cluster.run(progress=...)``)."""
PROGRESS_EVERY = 10.0
"""Wall seconds between progress reports."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a long run got: simulated seconds, live nodes done, events, wall seconds."""

    simulated: float
    done: int
    live: int
    events: int
    wall: float

    def __str__(self) -> str:
        return (f"simulated {self.simulated:.1f} s: {self.done} of {self.live} nodes done, "
                f"{self.events / 1e6:.1f} M events, {self.wall:.0f} s wall")


@dataclass(frozen=True, slots=True)
class Result:
    """What a run measured. Times in seconds of virtual time."""

    mode: str
    nodes: int
    image_bytes: int
    completion: tuple[float, ...] = field(repr=False)  # per live node, its pull time, sorted
    registry_bytes: int
    bytes_by_source: dict[str, int]
    bytes_started: int
    bound: float
    events: int
    wall: float
    end: float = 0.0  # when the last live node was done, from the common start
    failed: int = 0
    scheduler: dict[str, int] = field(default_factory=dict)
    coordinator: dict[str, int] = field(default_factory=dict)
    # the registry's egress over time: (t, bytes sent so far)
    registry_series: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    # what ran: the compiled build of the hot modules or the .py files (simulations.compiled)
    build: str = field(default_factory=in_use)
    # how its memory was allocated: on transparent huge pages or not (simulations.hugepages)
    memory: str = field(default_factory=hugepages.in_use)

    def percentile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the pull times."""
        ordered = self.completion
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    @property
    def makespan(self) -> float:
        """When the last node was done, from the common start."""
        return max(self.end, self.completion[-1])

    @property
    def ratio(self) -> float:
        """The makespan over the Kumar-Ross bound (≥ 1 for any real schedule)."""
        return self.makespan / self.bound

    def summary(self) -> dict[str, object]:
        """The figures the CLI prints (JSON-ready)."""
        data = asdict(self)
        del data["completion"], data["registry_series"]
        data.update(p50=self.percentile(0.5), p90=self.percentile(0.9),
                    p99=self.percentile(0.99), p999=self.percentile(0.999),
                    slowest=self.completion[-1], max=self.makespan, ratio=self.ratio,
                    registry_copies=self.registry_bytes / self.image_bytes)
        return data


def kumar_ross_bound(scenario: Scenario) -> float:
    """``max(F/u_registry, F/d_min, N·F/(u_registry + Σ u_i))``: the least time until all
    N nodes hold the F-byte image when all start at once (Kumar & Ross, 2006; no node
    holds it at the start). With staggered starts the last node cannot finish before
    its start plus ``F/d_min`` either."""
    f, n = scenario.image_bytes, scenario.nodes
    bound = max(f / scenario.registry_up, f / scenario.down,
                n * f / (scenario.registry_up + n * scenario.up))
    if scenario.arrival == "staggered":
        bound = max(bound, (n - 1) * scenario.stagger + f / scenario.down)
    if scenario.unpack is not None:  # the last node to have it all still unpacks it
        bound += f / scenario.unpack
    return bound


class Unpacking:
    """containerd unpacking the image after the fetch (``Scenario.unpack``), as a flow
    of the image's bytes through a CPU: the node's own (a host whose uplink is one core's
    rate), or with ``shared_cores`` a pool of that many cores all nodes draw on (each
    unpack still one core at most: its own host's downlink), shared max-min fairly like
    any link. Its bytes are not network bytes: they count in no statistic."""

    def __init__(self, scenario: Scenario, network: Network) -> None:
        self.network, self.size, self.rate = network, scenario.image_bytes, scenario.unpack
        self.pool: Host | None = None
        if scenario.unpack is not None and scenario.shared_cores is not None:
            self.pool = network.add_host("cpu", up=scenario.shared_cores * scenario.unpack)

    def start(self, name: str, on_done: Callable[[], None]) -> Flow | None:
        """Unpack on node ``name``; ``on_done`` when finished (at once if not modelled)."""
        if self.rate is None:
            on_done()
            return None
        if self.pool is None:
            part = self.network.hosts[name].part
            cpu = self.network.add_host(f"{name}/cpu", up=self.rate, part=part)
            return self.network.transfer(cpu, cpu, self.size, on_done, tag="unpack",
                                         counted=False)
        core = self.network.add_host(f"{name}/cpu", up=math.inf, down=self.rate,
                                     part=self.network.hosts[name].part)
        return self.network.transfer(self.pool, core, self.size, on_done, tag="unpack",
                                     counted=False)


def node_names(scenario: Scenario) -> list[str]:
    """The nodes' names, in index order.

    Interned, as the blobs' digests are: ``marshal`` then writes them as interned, and
    the partition that reads a window's messages gets its own objects back, not copies,
    so the dictionaries keyed by them compare pointers instead of the strings (and need
    not hash each copy)."""
    return [sys.intern(f"node-{i:05d}") for i in range(scenario.nodes)]


class Rollout:
    """When each node starts (see the module docstring); ``done`` reports finished nodes."""

    def __init__(self, scenario: Scenario, engine: Engine, names: list[str],
                 start: Callable[[str], None]) -> None:
        self.scenario, self.engine, self._start = scenario, engine, start
        self.order = list(names)
        random.Random(scenario.seed ^ 0x5EED).shuffle(self.order)
        self._next = 0
        self._open: set[str] = set()  # started in this batch, not done

    def begin(self) -> None:
        """Schedule or start the first nodes."""
        arrival = self.scenario.arrival
        if arrival == "all":
            self._start_next(len(self.order))
        elif arrival == "staggered":
            for i, name in enumerate(self.order):
                self.engine.schedule(i * self.scenario.stagger, partial(self._start, name))
        else:
            self._batch()

    def _batch(self) -> None:
        size = max(1, round(self.scenario.batch * len(self.order)))
        self._open = set(self.order[self._next:self._next + size])
        self._start_next(size)

    def _start_next(self, count: int) -> None:
        names = self.order[self._next:self._next + count]
        self._next += len(names)
        for name in names:
            self._start(name)

    def done(self, name: str) -> None:
        """``name`` finished or failed; in a rolling update the next batch may start."""
        if self.scenario.arrival != "rolling" or name not in self._open:
            return
        self._open.discard(name)
        if not self._open and self._next < len(self.order):
            self._batch()


def pick_victims(scenario: Scenario, names: list[str]) -> list[str]:
    """The nodes that crash, drawn with the scenario's seed."""
    return random.Random(scenario.seed ^ 0xFA11).sample(names, scenario.failures)


# What a window's message to another partition's node is (the first of its ints). The
# common ones travel as ints, read when they are due (no object made for them until
# then); the rest as their method's name and arguments (``Box.extra``).
_GENERIC: Final = 0  # Box.extra: the node's name (empty: the cluster), method, count, args
_REQUESTS: Final = 1  # target, asker, blob, count, the pieces
_PIECE: Final = 2  # target, holder, blob, piece, the holder's bits (62 pieces at most)
_REFUSALS: Final = 3  # target, holder, blob, count, each piece * 2 + whether busy


class Box:
    """One window's posts to another partition, in the order sent: for each, when it
    is due there (``times``), what it is (``ints``: see :data:`_REQUESTS` and the
    rest) and, for the uncommon ones, its method and arguments (``extra``). Flat
    lists, not an object per message: ``marshal`` writes the numbers as two arrays'
    bytes (:meth:`wire`), and the other side reads them where they are due
    (:meth:`Cluster.deliver`) instead of unmarshalling millions of small objects."""

    __slots__ = ("extra", "ints", "times")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ints: list[int] = []
        self.extra: list[object] = []

    def wire(self) -> Wire:
        """What crosses to the other partition: the times' and ints' bytes (machine
        order: both processes run on this machine), and the uncommon messages."""
        return (array("d", self.times).tobytes(), array("q", self.ints).tobytes(),
                self.extra)


Wire = tuple[bytes, bytes, list[object]]
"""A window's :class:`Box` as sent (:meth:`Box.wire`)."""


class Post(Timer):
    """An uncommon message from another partition for its node, due at ``time``: its own
    event (its arguments: ``count`` of ``box`` from ``at``, read in place)."""

    __slots__ = ("at", "box", "count", "method", "node")

    def __init__(self, time: float, node: SimNode, method: str, box: list[object], at: int,
                 count: int) -> None:
        super().__init__(time)
        self.node, self.method, self.box, self.at, self.count = node, method, box, at, count

    def run(self) -> None:
        self.node.receive(self.method, self.box, self.at, self.count)


class Arrival(Timer):
    """A common message from another partition for its node (requests, a piece,
    refusals), due at ``time``: its own event, reading its ints from ``at`` on."""

    __slots__ = ("at", "code", "ints", "node")

    def __init__(self, time: float, node: SimNode, code: int, ints: array[int],
                 at: int) -> None:
        super().__init__(time)
        self.node, self.code, self.ints, self.at = node, code, ints, at

    def run(self) -> None:
        node, ints, at = self.node, self.ints, self.at
        cluster = node.cluster
        sender = cluster.by_index[ints[at]]
        digest = cluster.digests[ints[at + 1]]
        code = self.code
        if code == _PIECE:
            node.piece(sender.name, digest, ints[at + 2], ints[at + 3])
        elif code == _REQUESTS:
            node.on_requests(sender, digest,
                             [ints[i] for i in range(at + 3, at + 3 + ints[at + 2])])
        else:
            node.refusals(sender.name, digest, [
                (ints[i] >> 1, bool(ints[i] & 1)) for i in range(at + 3, at + 3 + ints[at + 2])])


class Cluster:
    """The engine, network, registry host and nodes of one p2p run; with
    ``Scenario.partitions``, partition ``part``'s share of it (see
    :mod:`simulations.parallel`): every node and host exists, but only the partition's
    own act, and what they do to another partition's goes there as a message."""

    def __init__(self, scenario: Scenario, part: int = 0) -> None:
        self.scenario = scenario
        self.part = part
        self.partitioned = scenario.partitions > 1
        self.window = 2 * scenario.latency  # the shortest latency between partitions
        self.outbox = [Box() for _ in range(scenario.partitions)]
        self.soonest_post = math.inf  # the earliest ``at`` in the outbox
        self.engine = Engine(scenario.seed)
        self.network = Network(self.engine, exact=scenario.exact, parts=scenario.partitions)
        self.network.part = part
        self.registry = self.network.add_host("registry", up=scenario.registry_up,
                                              latency=scenario.latency)
        self._egress = self.network.watch(self.registry)
        self.registry_latency = scenario.registry_latency
        self.blobs = scenario.blobs()
        self.digests = [blob.digest for blob in self.blobs]  # a message's blob: its place
        self._blob_index = {digest: i for i, digest in enumerate(self.digests)}
        self.nodes: dict[str, SimNode] = {}
        for i, name in enumerate(node_names(scenario)):
            host = self.network.add_host(name, up=scenario.up, down=scenario.down,
                                         latency=scenario.latency,
                                         part=i % scenario.partitions)
            self.nodes[name] = SimNode(self, name, host, self.engine.child_rng())
        self.by_index = list(self.nodes.values())  # a message's node: its ``index``
        self._members = [Member(name, name) for name in self.nodes]
        self._coordinators: dict[str, SimNode] = {}
        self.rollout = Rollout(scenario, self.engine, list(self.nodes), self._start)
        self.victims = pick_victims(scenario, list(self.nodes))
        self.finished = False
        self._left = sum(1 for node in self.nodes.values() if self.local(node))
        self.unpacking = Unpacking(scenario, self.network)
        self._layouts: dict[int, PieceLayout] = {}

    def layout(self, size: int) -> PieceLayout:
        """The piece layout of a blob of ``size`` bytes (one object per size: a
        coordinator's node asks for one per call it takes in)."""
        layout = self._layouts.get(size)
        if layout is None:
            layout = self._layouts[size] = self.scenario.limits.layout(size)
        return layout

    def local(self, node: SimNode) -> bool:
        """Whether ``node`` is this partition's (always, unpartitioned)."""
        return node.host.part == self.part

    def post(self, at: float, part: int, name: str, method: str,
             args: tuple[object, ...]) -> None:
        """Have partition ``part`` run ``method(*args)`` of its node ``name`` (of the
        cluster, if empty) at ``at``, at least a window from now."""
        box = self._box(at, part)
        box.ints.append(_GENERIC)
        extra = box.extra
        extra.append(name)
        extra.append(method)
        extra.append(len(args))
        for arg in args:  # (extend() takes a slice assignment's path: slower for a few)
            extra.append(arg)

    def post_requests(self, at: float, to: SimNode, asker: SimNode, digest: str,
                      indices: list[int]) -> None:
        """:meth:`post` of ``to.on_requests(asker, digest, indices)``."""
        ints = self._common(at, _REQUESTS, to, asker, digest)
        ints.append(len(indices))
        for index in indices:
            ints.append(index)

    def post_piece(self, at: float, to: SimNode, holder: SimNode, digest: str, index: int,
                   bits: int) -> None:
        """:meth:`post` of ``to.piece(holder.name, digest, index, bits)``."""
        if bits >> 62:  # (not an int of the array: a blob of more than 62 pieces)
            self.post(at, to.host.part, to.name, "piece", (holder.name, digest, index, bits))
            return
        ints = self._common(at, _PIECE, to, holder, digest)
        ints.append(index)
        ints.append(bits)

    def post_refusals(self, at: float, to: SimNode, holder: SimNode, digest: str,
                      refusals: Sequence[tuple[int, bool]]) -> None:
        """:meth:`post` of ``to.refusals(holder.name, digest, refusals)``."""
        ints = self._common(at, _REFUSALS, to, holder, digest)
        ints.append(len(refusals))
        for index, busy in refusals:
            ints.append(index * 2 + busy)

    def _common(self, at: float, code: int, to: SimNode, sender: SimNode,
                digest: str) -> list[int]:
        """A common message's first ints (what it is, target, sender, blob) put in the
        box to ``to``'s partition; the ints, for the rest of it."""
        ints = self._box(at, to.host.part).ints
        ints.append(code)
        ints.append(to.index)
        ints.append(sender.index)
        ints.append(self._blob_index[digest])
        return ints

    def _box(self, at: float, part: int) -> Box:
        """The box to partition ``part``, with ``at`` the time of a message put in it."""
        if not at >= self.engine.now + self.window * (1 - 1e-9):
            raise ValueError(f"a message for {at} is due within a window of {self.engine.now}")
        if at < self.soonest_post:
            self.soonest_post = at
        box = self.outbox[part]
        box.times.append(at)
        return box

    def deliver(self, messages: list[Wire]) -> None:
        """Schedule the messages from the other partitions (by sender, each sender's in
        the order sent). They run in the order of their time, then sender, then place
        (the engine's order: time, then the order scheduled): the same in every run."""
        engine, nodes, by_index = self.engine, self.nodes, self.by_index
        for wired_times, wired_ints, box in messages:  # run by (time, the order scheduled)
            times: array[float] = array("d")
            times.frombytes(wired_times)
            ints: array[int] = array("q")
            ints.frombytes(wired_ints)
            place, i = 0, 0  # the next message's first int, and the next uncommon one's in box
            for at in times:
                code = ints[place]
                if code != _GENERIC:
                    engine.add(Arrival(at, by_index[ints[place + 1]], code, ints, place + 2))
                    place += 6 if code == _PIECE else 5 + ints[place + 4]
                    continue
                place += 1
                name, method = cast(str, box[i]), cast(str, box[i + 1])
                count = cast(int, box[i + 2])
                if method == "rpc":  # told to the coordinator's node now: SimNode.rpc's
                    # arguments after ``at``, as SimNode.remote_call posts them
                    nodes[name].rpc(
                        at, cast(str, box[i + 3]), cast(str, box[i + 4]),
                        cast(str, box[i + 5]), cast(int, box[i + 6]),
                        cast("tuple[object, ...]", box[i + 7]), cast(float, box[i + 8]),
                        cast(float, box[i + 9]))
                elif name:
                    engine.add(Post(at, nodes[name], method, box, i + 3, count))
                else:
                    engine.schedule_at(at, partial(getattr(self, method),
                                                   *box[i + 3:i + 3 + count]))
                i += 3 + count
            if place != len(ints) or i != len(box):
                raise ValueError("a window's messages do not add up")

    def crashed(self, node: SimNode) -> None:
        """``node`` crashed: the other partitions hear of it a window later."""
        for part in range(self.scenario.partitions):
            if part != self.part:
                self.post(self.engine.now + self.window, part, "", "peer_crashed",
                          (node.name,))

    def peer_crashed(self, name: str) -> None:
        """Another partition's node crashed: our flows to it stop."""
        node = self.nodes[name]
        node.crashed = True
        node.lost_flows()

    def upstream(self, name: str, digest: str, size: int, runs: list[list[int]]) -> None:
        """Another partition's node fetches ``runs`` of pieces of ``digest`` from the
        registry (its first ``Range`` request has arrived): this partition, the
        registry's, sends them as ``BlobDownload._upstream_run`` does, piece after
        piece, each one latency after the last arrived."""
        self._upstream_piece(self.nodes[name], digest, self.layout(size),
                             runs, 0)

    def _upstream_piece(self, node: SimNode, digest: str, layout: PieceLayout,
                        runs: list[list[int]], at: int) -> None:
        if node.crashed:
            return
        index = runs[0][at]
        latency = self.network.latency(self.registry, node.host)

        def got() -> None:
            self.post(self.engine.now + latency, node.host.part, node.name, "upstream_got",
                      (digest, index))
            if at + 1 < len(runs[0]):
                self.engine.schedule(latency, partial(self._upstream_piece, node, digest,
                                                      layout, runs, at + 1))
            elif len(runs) > 1:
                self.engine.schedule(2 * latency + self.registry_latency, partial(
                    self._upstream_piece, node, digest, layout, runs[1:], 0))

        self.network.transfer(self.registry, node.host, layout.length(index), got,
                              tag="registry", delay=0.0)

    def _start(self, name: str) -> None:
        node = self.nodes[name]
        if not self.local(node):
            return
        if node.crashed:  # its batch must not wait for it
            self.engine.schedule(0.0, lambda: self.rollout.done(name))
        else:
            node.start(self.blobs)

    def coordinator_of(self, digest: str) -> SimNode:
        """The node that coordinates ``digest`` among the members."""
        node = self._coordinators.get(digest)
        if node is None:
            member = coordinator_for(digest, self._members)
            node = self._coordinators[digest] = self.nodes[member.node_id]
        return node

    def node_done(self, node: SimNode) -> None:
        """Called by each node once it holds every blob (or has crashed)."""
        self._left -= 1
        if not self._left and not self.partitioned:  # else: all partitions'
            self.finished = True
        self.rollout.done(node.name)

    def _crash(self, name: str) -> None:
        node = self.nodes[name]
        node.crash()
        if node.done_at is None:
            self.node_done(node)
        if not self.partitioned:  # else every partition has it scheduled
            self.engine.schedule(self.scenario.detect, lambda: self._detected(name))

    def _run_reporting(self, until: float | None, progress: Callable[[Progress], None],
                       began: float) -> None:
        collecting = gc.isenabled()
        gc.disable()  # also between slices (the engine turns it off only while it runs)
        try:
            self._report_slices(until, progress, began)
        finally:
            if collecting:
                gc.enable()

    def _report_slices(self, until: float | None, progress: Callable[[Progress], None],
                       began: float) -> None:
        engine, t, told = self.engine, 0.0, began
        while True:
            t = t + PROGRESS_STEP if until is None else min(t + PROGRESS_STEP, until)
            engine.run(t)
            stats = engine.statistics()
            finished = stats.queued == 0 or (until is not None and t >= until)
            wall = time.perf_counter()
            if finished or wall - told >= PROGRESS_EVERY:
                told = wall
                live = [n for n in self.nodes.values() if not n.crashed]
                progress(Progress(
                    simulated=min(t, engine.now), done=sum(n.done_at is not None for n in live),
                    live=len(live), events=stats.events, wall=wall - began))
            if finished:
                return

    def _detected(self, name: str) -> None:
        self._members = [m for m in self._members if m.node_id != name]
        self._coordinators.clear()
        for node in self.nodes.values():
            if not node.crashed:
                node.coordinator.forget(name)

    def run(self, until: float | None = None,
            progress: Callable[[Progress], None] | None = None) -> Result:
        """Start the rollout and run until every live node is done and no flow is left.

        With ``progress``, the engine runs in slices of :data:`PROGRESS_STEP` simulated
        seconds and ``progress`` hears how far it got at most every
        :data:`PROGRESS_EVERY` seconds of wall time, and at the end (the events and their
        order are the same either way: nothing runs between slices).
        """
        began = time.perf_counter()
        self.begin()
        if progress is None:
            self.engine.run(until)
        else:
            self._run_reporting(until, progress, began)
        return result_of(self.scenario, [self.tally()], time.perf_counter() - began)

    def begin(self) -> None:
        """Schedule the rollout and the crashes (this partition's)."""
        self.engine.schedule(0.0, self.rollout.begin)  # first, and inside the engine's run
        for name in self.victims:
            if self.local(self.nodes[name]):
                self.engine.schedule(self.scenario.fail_at, partial(self._crash, name))
            if self.partitioned:
                self.engine.schedule(self.scenario.fail_at + self.scenario.detect,
                                     partial(self._detected, name))

    @property
    def left(self) -> int:
        """This partition's nodes not done yet."""
        return self._left

    def tally(self) -> Tally:
        """What this partition's nodes measured, for :func:`result_of`."""
        live = [n for n in self.nodes.values() if self.local(n) and not n.crashed]
        sched: dict[str, int] = {}
        leases = 0
        for node in self.nodes.values():
            if not self.local(node):
                continue
            leases += node.coordinator.statistics().leases_granted
            for download in node.downloads.values():
                s = download.sched.statistics()
                for key in ("requests_sent", "duplicates", "redundant", "timeouts",
                            "refusals", "pieces_from_upstream"):
                    sched[key] = sched.get(key, 0) + getattr(s, key)
                sched["cancels_ignored"] = sched.get("cancels_ignored", 0) \
                    + download.cancels_ignored
                sched["coordinator_gone"] = sched.get("coordinator_gone", 0) + download.lost
                sched["coordinator_slow"] = sched.get("coordinator_slow", 0) + download.slow
        return Tally(
            missing=[n.name for n in live if n.done_at is None],
            completion=[n.done_at - n.started_at for n in live
                        if n.done_at is not None and n.started_at is not None],
            end=max((n.done_at for n in live if n.done_at is not None), default=0.0),
            network=self.network.statistics(), events=self.engine.statistics().events,
            scheduler=sched, leases=leases,
            registry_series=tuple(self._egress) if self.registry.part == self.part else (),
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """What one partition's nodes measured (all of them, unpartitioned)."""

    missing: list[str]
    completion: list[float]
    end: float
    network: NetworkStatistics
    events: int
    scheduler: dict[str, int]
    leases: int
    registry_series: tuple[tuple[float, float], ...]


def result_of(scenario: Scenario, tallies: list[Tally], wall: float) -> Result:
    """The :class:`Result` of a run from its partitions' tallies."""
    missing = [name for t in tallies for name in t.missing]
    if missing:
        raise RuntimeError(f"{len(missing)} nodes did not finish, e.g. {missing[0]}")
    by_tag: Counter[str] = Counter()
    sched: Counter[str] = Counter()
    for t in tallies:
        by_tag.update(t.network.bytes_by_tag)
        sched.update(t.scheduler)
    return Result(
        mode="p2p", nodes=scenario.nodes, image_bytes=scenario.image_bytes,
        completion=tuple(sorted(c for t in tallies for c in t.completion)),
        end=max(t.end for t in tallies), failed=scenario.failures,
        registry_bytes=by_tag.get("registry", 0), bytes_by_source=dict(sorted(by_tag.items())),
        bytes_started=sum(t.network.bytes_started for t in tallies),
        bound=kumar_ross_bound(scenario), events=sum(t.events for t in tallies), wall=wall,
        scheduler=dict(sched), coordinator={"leases_granted": sum(t.leases for t in tallies)},
        registry_series=next((t.registry_series for t in tallies if t.registry_series), ()),
    )


def run_p2p(scenario: Scenario, progress: Callable[[Progress], None] | None = None) -> Result:
    """The nodes pull the image through p2pd's swarm (``progress``: see Cluster.run),
    split between processes if the scenario has ``partitions`` (simulations.parallel)."""
    if scenario.partitions > 1:
        from simulations.parallel import run_partitioned
        return run_partitioned(scenario, progress)
    return Cluster(scenario).run(progress=progress)


def run_direct(scenario: Scenario) -> Result:
    """The baseline: every node pulls straight from the registry (see baselines)."""
    from simulations.baselines import run_layers
    return run_layers(scenario, share=False)


def run_spegel(scenario: Scenario) -> Result:
    """The Spegel-like baseline: complete layers shared (see baselines)."""
    from simulations.baselines import run_layers
    return run_layers(scenario, share=True)
