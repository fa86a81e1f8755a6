"""The baselines p2pd is measured against, on the same network model and arrivals.

How it works. Each node pulls the image's layers as containerd does: whole blobs,
``layer_concurrency`` at a time, each one flow. Where a layer comes from:

- ``direct`` (``share=False``): always the registry — a cluster without p2pd.
- ``spegel`` (``share=True``): a Spegel-like mirror. Nodes advertise the layers they
  hold *complete* (containerd's content store); a node pulling a layer that some live
  node holds streams the whole blob from one of them, chosen at random, and otherwise
  from the registry. Nothing is shared while it is being downloaded, so when every node
  starts at once nobody has anything to share and the run is the direct pull: the
  negative result Spegel's own benchmark reports. Serving is limited only by the node's
  uplink (and disk, ``Scenario.disk``).

A crashed node's flows stop; a layer it was serving is pulled again, from the start,
from wherever the rule above says.
"""

from __future__ import annotations

import random
import time
from collections import deque
from functools import partial

from simulations.cluster import (
    Result,
    Rollout,
    Scenario,
    Unpacking,
    kumar_ross_bound,
    node_names,
    pick_victims,
)
from simulations.engine import Engine
from simulations.network import Flow, Host, Network
from simulations.node import BlobSpec


class _Puller:
    """One node pulling whole layers."""

    def __init__(self, run: _LayerRun, name: str, host: Host) -> None:
        self.run, self.name, self.host = run, name, host
        self.waiting: deque[BlobSpec] = deque()
        self.active = 0
        self.started_at: float | None = None
        self.done_at: float | None = None
        self.crashed = False
        self.flows: dict[Flow, tuple[BlobSpec, _Puller | None]] = {}  # incoming

    def start(self) -> None:
        self.started_at = self.run.engine.now
        self.waiting.extend(self.run.blobs)
        for _ in range(self.run.scenario.limits.layer_concurrency):
            self._next()

    def _next(self) -> None:
        if self.waiting and not self.crashed:
            self.active += 1
            self.fetch(self.waiting.popleft())

    def fetch(self, blob: BlobSpec) -> None:
        """Pull ``blob`` from a holder or the registry (a request first: one latency,
        plus the registry's time to answer)."""
        run = self.run
        source = run.source(blob, self) if run.share else None
        src_host = run.registry if source is None else source.host
        delay = run.network.latency(self.host, src_host)
        if source is None:
            delay += run.scenario.registry_latency

        def begin() -> None:
            if self.crashed:
                return
            if source is not None and source.crashed:
                self.fetch(blob)  # connection refused: choose again
                return
            tag = "registry" if source is None else "peer"
            flow = run.network.transfer(src_host, self.host, blob.size,
                                        lambda: self._got(flow, blob), tag=tag)
            self.flows[flow] = (blob, source)

        run.engine.schedule(delay, begin)

    def _got(self, flow: Flow, blob: BlobSpec) -> None:
        del self.flows[flow]
        if self.crashed:
            return
        self.run.holders[blob.digest].append(self)
        self.active -= 1
        self._next()
        if not self.active and not self.waiting and self.done_at is None:
            self.run.unpacking.start(self.name, self._unpacked)

    def _unpacked(self) -> None:
        if not self.crashed:
            self.done_at = self.run.engine.now
            self.run.done(self)


class _LayerRun:
    def __init__(self, scenario: Scenario, share: bool) -> None:
        self.scenario, self.share = scenario, share
        self.engine = Engine(scenario.seed)
        self.rng = random.Random(scenario.seed)
        self.network = Network(self.engine, exact=scenario.exact)
        self.registry = self.network.add_host("registry", up=scenario.registry_up,
                                              latency=scenario.latency)
        self._egress = self.network.watch(self.registry)
        self.blobs = scenario.blobs()
        self.holders: dict[str, list[_Puller]] = {b.digest: [] for b in self.blobs}
        self.pullers = {
            name: _Puller(self, name, self.network.add_host(
                name, up=scenario.up, down=scenario.down, latency=scenario.latency))
            for name in node_names(scenario)
        }
        self.rollout = Rollout(scenario, self.engine, list(self.pullers), self._start)
        self.unpacking = Unpacking(scenario, self.network)

    def _start(self, name: str) -> None:
        puller = self.pullers[name]
        if puller.crashed:
            self.engine.schedule(0.0, lambda: self.rollout.done(name))
        else:
            puller.start()

    def source(self, blob: BlobSpec, asker: _Puller) -> _Puller | None:
        """A live node holding ``blob`` complete, at random; ``None``: the registry."""
        live = [p for p in self.holders[blob.digest] if not p.crashed]
        self.holders[blob.digest] = live
        return self.rng.choice(live) if live else None

    def done(self, puller: _Puller) -> None:
        self.rollout.done(puller.name)

    def crash(self, name: str) -> None:
        victim = self.pullers[name]
        victim.crashed = True
        for flow in list(victim.flows):
            self.network.cancel(flow)
        victim.flows.clear()
        for puller in self.pullers.values():  # layers it was serving start again
            for flow, (blob, source) in list(puller.flows.items()):
                if source is victim:
                    self.network.cancel(flow)
                    del puller.flows[flow]
                    puller.fetch(blob)
        if victim.done_at is None:
            self.rollout.done(name)

    def run(self) -> Result:
        began = time.perf_counter()
        for name in pick_victims(self.scenario, list(self.pullers)):
            self.engine.schedule(self.scenario.fail_at, partial(self.crash, name))
        self.rollout.begin()
        self.engine.run()
        live = [p for p in self.pullers.values() if not p.crashed]
        missing = [p.name for p in live if p.done_at is None]
        if missing:
            raise RuntimeError(f"{len(missing)} nodes did not finish, e.g. {missing[0]}")
        stats = self.network.statistics()
        return Result(
            mode="spegel" if self.share else "direct", nodes=self.scenario.nodes,
            image_bytes=self.scenario.image_bytes,
            completion=tuple(sorted(p.done_at - p.started_at for p in live
                                    if p.done_at is not None and p.started_at is not None)),
            end=max((p.done_at for p in live if p.done_at is not None), default=0.0),
            failed=self.scenario.failures,
            registry_bytes=stats.bytes_by_tag.get("registry", 0),
            bytes_by_source=stats.bytes_by_tag, bytes_started=stats.bytes_started,
            bound=kumar_ross_bound(self.scenario), events=self.engine.statistics().events,
            wall=time.perf_counter() - began,
            registry_series=tuple(self._egress),
        )


def run_layers(scenario: Scenario, *, share: bool) -> Result:
    """Run the direct (``share=False``) or Spegel-like (``share=True``) baseline."""
    return _LayerRun(scenario, share).run()
