"""A simulated node: on the upload side busy requests wait FIFO, then are refused; beyond
MAX_WAITING waiters they are refused at once. On the download side a node fetching a
layer upstream leaves the next layers' leases to others."""

from collections import Counter
from dataclasses import replace

import pytest

from p2pd.core.coordinator import BlobSwarm, Lease
from p2pd.core.tuning import (
    BUSY_AFTER,
    LOOKUP_JITTER,
    MAX_UPLOADS,
    MAX_WAITING,
    SAMPLE_ABOVE,
)
from simulations.cluster import Cluster, MiB, Scenario
from simulations.node import BlobDownload, Limits, SimNode

SCENARIO = Scenario(nodes=2, image_bytes=8 * MiB, layers=1, node_up=10 * MiB,
                    node_down=100 * MiB, registry_up=10 * MiB, seed=1)


def _pair() -> tuple[Cluster, SimNode, SimNode, list[tuple[str, float, int]]]:
    cluster = Cluster(SCENARIO)
    holder, asker = cluster.nodes.values()
    blob = SCENARIO.blobs()[0]
    download = asker.downloads[blob.digest] = BlobDownload(asker, blob)
    seen: list[tuple[str, float, int]] = []
    download.refused = lambda peer, index, busy: seen.append(  # type: ignore[method-assign]
        ("busy" if busy else "lacks", cluster.engine.now, index))
    download.from_peer = lambda peer, index, bits: seen.append(  # type: ignore[method-assign]
        ("piece", cluster.engine.now, index))
    holder.held[blob.digest] = 0b11
    return cluster, holder, asker, seen


def test_a_request_waiting_too_long_for_a_slot_is_refused_as_busy() -> None:
    cluster, holder, asker, seen = _pair()
    holder.uploading = MAX_UPLOADS  # every slot taken, none frees
    holder.on_request(asker, SCENARIO.blobs()[0].digest, 1)
    cluster.engine.run()
    latency = cluster.network.latency(holder.host, asker.host)
    assert seen == [("busy", pytest.approx(BUSY_AFTER + latency), 1)]


def test_a_queued_request_gets_the_next_free_slot() -> None:
    cluster, holder, asker, seen = _pair()
    digest = SCENARIO.blobs()[0].digest
    holder.uploading = MAX_UPLOADS - 1
    holder.on_request(asker, digest, 0)  # takes the last slot: 1 MiB at 10 MiB/s
    holder.on_request(asker, digest, 1)  # waits 0.1 s for it, well within BUSY_AFTER
    cluster.engine.run()
    assert [(kind, index) for kind, _, index in seen] == [("piece", 0), ("piece", 1)]
    assert not holder._queue


def test_pieces_for_one_asker_go_one_after_another_each_holding_a_slot() -> None:
    # The daemon sends whole frames onto a connection one at a time: two 1 MiB pieces
    # asked together at 10 MiB/s arrive 0.1 s apart, not both at 0.2 s.
    cluster, holder, asker, seen = _pair()
    holder.on_requests(asker, SCENARIO.blobs()[0].digest, (0, 1))
    cluster.engine.run(until=0.01)
    assert holder.uploading == 2
    cluster.engine.run()
    latency = cluster.network.latency(holder.host, asker.host)
    arrived = [(index, when - latency) for _, when, index in seen]
    assert arrived == [(0, pytest.approx(0.1)), (1, pytest.approx(0.2))]
    assert holder.uploading == 0 and not holder._conns
    stats = cluster.network.statistics()
    assert stats.flows_started == stats.flows_completed == 2


def test_an_asker_that_dies_frees_every_slot_its_pieces_held() -> None:
    cluster, holder, asker, seen = _pair()
    holder.on_requests(asker, SCENARIO.blobs()[0].digest, (0, 1))
    cluster.engine.run(until=0.05)
    assert holder.uploading == 2
    asker.crash()
    cluster.engine.run()
    assert holder.uploading == 0 and not holder._conns and not seen


def test_beyond_max_waiting_a_request_is_refused_at_once() -> None:
    cluster, holder, asker, seen = _pair()
    digest = SCENARIO.blobs()[0].digest
    holder.uploading = MAX_UPLOADS  # every slot taken, none frees
    for _ in range(MAX_WAITING + 1):
        holder.on_request(asker, digest, 1)
    cluster.engine.run()
    latency = cluster.network.latency(holder.host, asker.host)
    assert [when for _, when, _ in seen] == [pytest.approx(latency)] + [
        pytest.approx(BUSY_AFTER + latency)] * MAX_WAITING


def test_each_waiting_request_is_refused_when_its_own_wait_is_over() -> None:
    cluster, holder, asker, seen = _pair()
    digest = SCENARIO.blobs()[0].digest
    holder.uploading = MAX_UPLOADS  # every slot taken, none frees
    for at in (0.0, 0.3, 0.6):
        cluster.engine.schedule(at, lambda: holder.on_request(asker, digest, 1))
    cluster.engine.run()
    latency = cluster.network.latency(holder.host, asker.host)
    assert [when for _, when, _ in seen] == [
        pytest.approx(at + BUSY_AFTER + latency) for at in (0.0, 0.3, 0.6)]
    assert not holder._queue and holder._expiry is None


def _lease_holders(monkeypatch: pytest.MonkeyPatch, scenario: Scenario) -> list[str]:
    """Who was granted each upstream lease in a run of ``scenario``."""
    granted: list[str] = []
    request = BlobSwarm.request_lease

    def spy(swarm: BlobSwarm, node_id: str, now: float, ttl: float) -> Lease | None:
        had = node_id in swarm.leases
        lease = request(swarm, node_id, now, ttl)
        if lease is not None and not had:
            granted.append(node_id)
        return lease

    monkeypatch.setattr(BlobSwarm, "request_lease", spy)
    Cluster(scenario).run()
    return granted


@pytest.mark.parametrize("defer", [True, False])
def test_a_node_fetching_one_layer_upstream_leaves_the_next_leases_to_others(
    monkeypatch: pytest.MonkeyPatch, defer: bool,
) -> None:
    # One node starts 50 ms before the next: without the deferral it asks for every
    # lease before anyone else and fetches the whole image through its own downlink.
    scenario = Scenario(nodes=4, image_bytes=32 * MiB, layers=4, node_up=4 * MiB,
                        node_down=4 * MiB, registry_up=8 * MiB, arrival="staggered",
                        stagger=0.05, seed=1)
    if not defer:  # as before: every download asks at once, whatever the others do
        monkeypatch.setattr(SimNode, "leasing", lambda node, besides: False)
        monkeypatch.setattr(SimNode, "fetching_upstream", lambda node, besides: False)
    holders = Counter(_lease_holders(monkeypatch, scenario))
    assert sum(holders.values()) == scenario.layers
    # The 4th layer starts when one of the first three is in: its lease may go anywhere.
    assert max(holders.values()) == (2 if defer else 4), holders


def test_a_node_alone_takes_every_lease_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(nodes=1, image_bytes=32 * MiB, layers=4, node_up=4 * MiB,
                        node_down=4 * MiB, registry_up=8 * MiB, seed=1)
    assert _lease_holders(monkeypatch, scenario) == ["node-00000"] * scenario.layers
    result = Cluster(scenario).run()
    assert result.makespan == pytest.approx(32 / 4, rel=0.05)  # its downlink, no pause


def test_nodes_starting_together_look_up_out_of_step_and_are_refused_less() -> None:
    # In step, every node learns of a new piece at the same lookup and asks its one
    # holder at once: most are refused as busy. Jittered waits spread the askers out.
    def refusals(jitter: float) -> int:
        scenario = Scenario(nodes=50, image_bytes=64 * MiB, layers=2, node_up=100 * MiB,
                            node_down=100 * MiB, registry_up=100 * MiB, seed=1,
                            limits=Limits(piece_size=MiB, lookup_jitter=jitter))
        return Cluster(scenario).run().scheduler["refusals"]

    assert refusals(LOOKUP_JITTER) * 2 < refusals(0.0)


# -- the coordinator's CPU --------------------------------------------------------------


def test_a_coordinator_works_through_messages_one_at_a_time() -> None:
    cluster = Cluster(SCENARIO)
    coordinator, asker = cluster.nodes.values()
    latency = cluster.network.latency(asker.host, coordinator.host)
    ran: list[float] = []
    answered: list[float] = []
    for _ in range(3):  # sent together: each waits for the ones before it
        asker.call(coordinator, lambda: ran.append(cluster.engine.now),
                   lambda _: answered.append(cluster.engine.now), cost=0.1)
    cluster.engine.run()
    assert ran == pytest.approx([latency + 0.1, latency + 0.2, latency + 0.3])
    assert answered == pytest.approx([t + latency for t in ran])


def test_an_answer_later_than_the_patience_is_given_up_and_still_costs() -> None:
    cluster = Cluster(SCENARIO)
    coordinator, asker = cluster.nodes.values()
    events: list[tuple[str, float]] = []
    asker.call(coordinator, lambda: events.append(("query", cluster.engine.now)),
               lambda _: events.append(("answer", cluster.engine.now)), cost=5.0,
               timeout=lambda gone: events.append((f"timeout gone={gone}", cluster.engine.now)),
               patience=3.0)
    cluster.engine.run()
    latency = cluster.network.latency(asker.host, coordinator.host)
    assert events == [("timeout gone=False", pytest.approx(3.0)),
                      ("query", pytest.approx(latency + 5.0))]


def test_a_dead_coordinator_times_out_as_gone() -> None:
    cluster = Cluster(SCENARIO)
    coordinator, asker = cluster.nodes.values()
    coordinator.crashed = True
    events: list[tuple[str, float]] = []
    asker.call(coordinator, lambda: events.append(("query", 0.0)),
               lambda _: events.append(("answer", 0.0)), cost=0.01,
               timeout=lambda gone: events.append((f"gone={gone}", cluster.engine.now)),
               patience=3.0)
    cluster.engine.run()
    assert events == [("gone=True", pytest.approx(3.0))]


def test_a_swamped_coordinator_slows_the_pull_but_sends_nobody_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 40 nodes, and every message costs its coordinator 300 times the measured CPU: a
    # lookup takes it about 0.1 s, and 40 downloads ask at once and then every 0.25 s,
    # so its answers come seconds late and lease answers later than RPC_TIMEOUT. None
    # of that is taken for a dead coordinator: nobody goes solo, the registry sends the
    # image once, and the pull is only slower than with coordinators that cost nothing.
    import p2pd.core.tuning as tuning
    import simulations.node as node_module

    # askers that do not back off from a slow coordinator (LOOKUP_BACKOFF): the worst case
    monkeypatch.setattr(tuning, "LOOKUP_BACKOFF", 0.0)
    scenario = Scenario(nodes=40, image_bytes=64 * MiB, layers=1, node_up=50 * MiB,
                        node_down=50 * MiB, registry_up=50 * MiB, seed=1)
    free = Cluster(replace(scenario, coordinator_cpu=False)).run()
    slow = {kind: (300 * fixed, 300 * per_piece)
            for kind, (fixed, per_piece) in node_module.COORDINATOR_CPU.items()}
    monkeypatch.setattr(node_module, "COORDINATOR_CPU", slow)
    cluster = Cluster(scenario)
    swamped = cluster.run()
    downloads = [d for n in cluster.nodes.values() for d in n.downloads.values()]
    assert max(d.answer_time for d in downloads) > 2.0  # it was swamped
    assert swamped.scheduler["coordinator_slow"] > 0  # answers given up on, not solo
    assert not any(d.solo for d in downloads)
    assert swamped.registry_bytes == free.registry_bytes == scenario.image_bytes
    assert swamped.makespan > free.makespan


def test_askers_back_off_from_a_swamped_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    # the swamped coordinator above: waiting LOOKUP_BACKOFF times each answer's delay
    # before the next lookup sends it fewer lookups and shortens its queue
    import p2pd.core.tuning as tuning
    import simulations.node as node_module

    scenario = Scenario(nodes=40, image_bytes=64 * MiB, layers=1, node_up=50 * MiB,
                        node_down=50 * MiB, registry_up=50 * MiB, seed=1)
    slow = {kind: (300 * fixed, 300 * per_piece)
            for kind, (fixed, per_piece) in node_module.COORDINATOR_CPU.items()}
    monkeypatch.setattr(node_module, "COORDINATOR_CPU", slow)
    real = BlobDownload._lookup

    def run(backoff: float) -> tuple[int, float, int]:
        monkeypatch.setattr(tuning, "LOOKUP_BACKOFF", backoff)
        lookups = 0

        def counting(self: BlobDownload) -> None:
            nonlocal lookups
            lookups += 1
            real(self)

        monkeypatch.setattr(BlobDownload, "_lookup", counting)
        cluster = Cluster(scenario)
        result = cluster.run()
        slowest = max(d.answer_time for n in cluster.nodes.values()
                      for d in n.downloads.values())
        return lookups, slowest, result.registry_bytes

    default = tuning.LOOKUP_BACKOFF
    eager, patient = run(0.0), run(default)
    assert patient[0] < eager[0]  # fewer lookups
    assert patient[1] < eager[1]  # answered sooner
    assert patient[2] == eager[2] == scenario.image_bytes  # nobody went solo


@pytest.mark.parametrize("gone", [False, True])
def test_only_a_dead_coordinator_sends_a_download_solo(gone: bool) -> None:
    cluster = Cluster(SCENARIO)
    node = next(iter(cluster.nodes.values()))
    blob = SCENARIO.blobs()[0]
    download = node.downloads[blob.digest] = BlobDownload(node, blob)
    download._unreachable("lookup", gone)
    assert download.solo == gone
    assert download.slow == (not gone) and download.lost == gone
    assert (len(download.upstream) == download.layout.count) == gone


def test_lookups_cost_a_sampled_answer_once_more_than_sample_above_nodes_asked() -> None:
    scenario = replace(SCENARIO, nodes=SAMPLE_ABOVE + 6)
    cluster = Cluster(scenario)
    blob = scenario.blobs()[0]
    downloads = [node.downloads.setdefault(blob.digest, BlobDownload(node, blob))
                 for node in cluster.nodes.values()]
    target = downloads[0].coordinator
    for download in downloads:  # all at once: the coordinator works through them in turn
        download._lookup()
    built, sampled = (target.cpu_cost(kind, downloads[0].layout.count)
                     for kind in ("lookup", "sampled lookup"))
    assert sampled < built
    first = min(cluster.network.latency(d.node.host, target.host) for d in downloads
                if d.node is not target)
    assert target.cpu_free == pytest.approx(
        first + SAMPLE_ABOVE * built + 6 * sampled, rel=0.05)


@pytest.mark.parametrize("hashed", [0b1111, 0b0011])
def test_a_piece_tells_the_asker_what_its_sender_held_whose_hash_it_knows(hashed: int) -> None:
    cluster = Cluster(SCENARIO)
    holder, asker = cluster.nodes.values()
    blob = SCENARIO.blobs()[0]
    download = asker.downloads[blob.digest] = BlobDownload(asker, blob)
    download.hashed = hashed  # the pieces our lookups have shown announced
    asker.held[blob.digest] = 0
    download.from_peer(holder.name, 0, 0b1111)  # it held pieces 0-3 when it sent piece 0
    assert download.sched.known(holder.name) == {i for i in range(4) if hashed >> i & 1}
