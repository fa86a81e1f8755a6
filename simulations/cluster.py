"""Scenarios and runs: a cluster of :class:`~simulations.node.SimNode` and a registry.

A :class:`Scenario` fixes the cluster (nodes, their upload/download capacity, link
latency), the registry (egress capacity, time to answer a request) and the image (total
size cut into ``layers`` blobs of equal size). :func:`run_p2p` starts every node at once
and runs until the last one holds every blob; :func:`run_direct` is the baseline where
every node pulls each layer from the registry as one flow, sharing its egress. Both
return a :class:`Result` with per-node completion percentiles, bytes by source and the
Kumar-Ross lower bound on the time until every node is done.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field

from p2pd.core.membership import Member, coordinator_for
from simulations.engine import Engine
from simulations.network import Network
from simulations.node import BlobSpec, SimNode

MiB = 1 << 20


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

    def blobs(self) -> list[BlobSpec]:
        """The image's layers: equal sizes, the remainder in the last one."""
        if self.layers < 1 or self.image_bytes < self.layers:
            raise ValueError("need at least one layer and one byte per layer")
        size, extra = divmod(self.image_bytes, self.layers)
        return [
            BlobSpec("sha256:" + hashlib.sha256(f"layer-{k}".encode()).hexdigest(),
                     size + (extra if k == self.layers - 1 else 0))
            for k in range(self.layers)
        ]


@dataclass(frozen=True, slots=True)
class Result:
    """What a run measured. Times in seconds of virtual time from the common start."""

    mode: str
    nodes: int
    image_bytes: int
    completion: tuple[float, ...] = field(repr=False)  # per node, sorted
    registry_bytes: int
    bytes_by_source: dict[str, int]
    bytes_started: int
    bound: float
    events: int
    wall: float
    scheduler: dict[str, int] = field(default_factory=dict)
    coordinator: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the completion times."""
        ordered = self.completion
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    @property
    def makespan(self) -> float:
        """When the last node was done."""
        return self.completion[-1]

    @property
    def ratio(self) -> float:
        """The makespan over the Kumar-Ross bound (≥ 1 for any real schedule)."""
        return self.makespan / self.bound

    def summary(self) -> dict[str, object]:
        """The figures the CLI prints (JSON-ready)."""
        data = asdict(self)
        del data["completion"]
        data.update(p50=self.percentile(0.5), p90=self.percentile(0.9),
                    p99=self.percentile(0.99), max=self.makespan, ratio=self.ratio,
                    registry_copies=self.registry_bytes / self.image_bytes)
        return data


def kumar_ross_bound(scenario: Scenario) -> float:
    """``max(F/u_registry, F/d_min, N·F/(u_registry + Σ u_i))``: the least time until all
    N nodes hold the F-byte image (Kumar & Ross, 2006; no node holds it at the start)."""
    f, n = scenario.image_bytes, scenario.nodes
    return max(f / scenario.registry_up, f / scenario.node_down,
               n * f / (scenario.registry_up + n * scenario.node_up))


class Cluster:
    """The engine, network, registry host and nodes of one p2p run."""

    def __init__(self, scenario: Scenario) -> None:
        if scenario.nodes < 1:
            raise ValueError("need at least one node")
        self.scenario = scenario
        self.engine = Engine(scenario.seed)
        self.network = Network(self.engine, exact=scenario.exact)
        self.registry = self.network.add_host("registry", up=scenario.registry_up,
                                              latency=scenario.latency)
        self.registry_latency = scenario.registry_latency
        self.nodes: dict[str, SimNode] = {}
        for i in range(scenario.nodes):
            name = f"node-{i:05d}"
            host = self.network.add_host(name, up=scenario.node_up, down=scenario.node_down,
                                         latency=scenario.latency)
            self.nodes[name] = SimNode(self, name, host, self.engine.child_rng())
        self._members = [Member(name, name) for name in self.nodes]
        self._coordinators: dict[str, SimNode] = {}
        self.finished = False
        self._done = 0

    def coordinator_of(self, digest: str) -> SimNode:
        """The node that coordinates ``digest`` (every member is alive throughout)."""
        node = self._coordinators.get(digest)
        if node is None:
            member = coordinator_for(digest, self._members)
            node = self._coordinators[digest] = self.nodes[member.node_id]
        return node

    def node_done(self, node: SimNode) -> None:
        """Called by each node once it holds every blob."""
        self._done += 1
        if self._done == len(self.nodes):
            self.finished = True

    def run(self, until: float | None = None) -> Result:
        """Start every node now and run until all are done and no flow is left."""
        began = time.perf_counter()
        blobs = self.scenario.blobs()
        for node in self.nodes.values():
            node.start(blobs)
        self.engine.run(until)
        missing = [n.name for n in self.nodes.values() if n.done_at is None]
        if missing:
            raise RuntimeError(f"{len(missing)} nodes did not finish, e.g. {missing[0]}")
        wall = time.perf_counter() - began
        stats = self.network.statistics()
        sched: dict[str, int] = {}
        for node in self.nodes.values():
            for download in node.downloads.values():
                s = download.sched.statistics()
                for key in ("requests_sent", "duplicates", "redundant", "timeouts",
                            "refusals", "pieces_from_upstream"):
                    sched[key] = sched.get(key, 0) + getattr(s, key)
                sched["cancels_ignored"] = sched.get("cancels_ignored", 0) \
                    + download.cancels_ignored
        leases = sum(n.coordinator.statistics().leases_granted for n in self.nodes.values())
        return Result(
            mode="p2p", nodes=len(self.nodes), image_bytes=self.scenario.image_bytes,
            completion=tuple(sorted(n.done_at - n.started_at for n in self.nodes.values()
                                    if n.done_at is not None)),
            registry_bytes=stats.bytes_by_tag.get("registry", 0),
            bytes_by_source=stats.bytes_by_tag, bytes_started=stats.bytes_started,
            bound=kumar_ross_bound(self.scenario), events=self.engine.statistics().events,
            wall=wall, scheduler=sched, coordinator={"leases_granted": leases},
        )


def run_p2p(scenario: Scenario) -> Result:
    """Every node pulls the image through the swarm at once."""
    return Cluster(scenario).run()


def run_direct(scenario: Scenario) -> Result:
    """The baseline: every node pulls every layer straight from the registry at once."""
    began = time.perf_counter()
    engine = Engine(scenario.seed)
    network = Network(engine, exact=scenario.exact)
    registry = network.add_host("registry", up=scenario.registry_up, latency=scenario.latency)
    blobs = scenario.blobs()
    done_at: list[float] = []

    def pull(name: str) -> None:
        host = network.add_host(name, up=scenario.node_up, down=scenario.node_down,
                                latency=scenario.latency)
        left = [len(blobs)]

        def got() -> None:
            left[0] -= 1
            if not left[0]:
                done_at.append(engine.now)

        def begin() -> None:
            for blob in blobs:
                network.transfer(registry, host, blob.size, got, tag="registry")

        engine.schedule(network.latency(host, registry) + scenario.registry_latency, begin)

    for i in range(scenario.nodes):
        pull(f"node-{i:05d}")
    engine.run()
    stats = network.statistics()
    return Result(
        mode="direct", nodes=scenario.nodes, image_bytes=scenario.image_bytes,
        completion=tuple(sorted(done_at)), registry_bytes=stats.bytes_by_tag.get("registry", 0),
        bytes_by_source=stats.bytes_by_tag, bytes_started=stats.bytes_started,
        bound=kumar_ross_bound(scenario), events=engine.statistics().events,
        wall=time.perf_counter() - began,
    )
