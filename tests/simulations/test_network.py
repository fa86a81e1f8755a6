"""The flow model: max-min fair sharing, latency, cancel, and the local recomputation."""

import math
import random
from collections.abc import Callable

import pytest

from simulations import network
from simulations.engine import Engine
from simulations.network import Network, max_min_rates

MB = 1_000_000


def _finish_times(net: Network, flows: list[tuple[str, str, int]]) -> list[float]:
    done: list[float] = [-1.0] * len(flows)
    for i, (src, dst, size) in enumerate(flows):
        def mark(i: int = i) -> None:
            done[i] = net.engine.now
        net.transfer(net.hosts[src], net.hosts[dst], size, mark, tag=src)
    net.engine.run()
    return done


@pytest.mark.parametrize("exact", [False, True])
def test_two_flows_on_one_uplink_each_get_half(exact: bool) -> None:
    net = Network(Engine(seed=1), exact=exact)
    net.add_host("a", up=100 * MB)
    net.add_host("b", up=1, down=1000 * MB)
    net.add_host("c", up=1, down=1000 * MB)
    # 50 MB each at 50 MB/s: both done at 1 s; alone, one would take 0.5 s
    assert _finish_times(net, [("a", "b", 50 * MB), ("a", "c", 50 * MB)]) == \
        pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("exact", [False, True])
def test_a_flow_limited_by_its_receiver_leaves_the_rest_to_others(exact: bool) -> None:
    net = Network(Engine(seed=1), exact=exact)
    net.add_host("a", up=100 * MB)
    net.add_host("slow", up=1, down=10 * MB)
    net.add_host("fast", up=1, down=1000 * MB)
    # a->slow gets 10 MB/s, a->fast the remaining 90 MB/s (not 50)
    slow, fast = _finish_times(net, [("a", "slow", 10 * MB), ("a", "fast", 90 * MB)])
    assert slow == pytest.approx(1.0)
    assert fast == pytest.approx(1.0)


def test_rates_rise_when_a_flow_ends() -> None:
    net = Network(Engine(seed=1))
    net.add_host("a", up=100 * MB)
    net.add_host("b", up=1, down=1000 * MB)
    net.add_host("c", up=1, down=1000 * MB)
    # 25 MB at 50 MB/s -> 0.5 s; then 75 - 25 = 50 MB left at 100 MB/s -> 1.0 s
    assert _finish_times(net, [("a", "b", 25 * MB), ("a", "c", 75 * MB)]) == \
        pytest.approx([0.5, 1.0])


def test_latency_is_added_to_delivery_and_cancel_counts_waste() -> None:
    net = Network(Engine(seed=1))
    a = net.add_host("a", up=10 * MB, latency=0.01)
    b = net.add_host("b", up=1, down=10 * MB, latency=0.02)
    seen: list[float] = []
    net.transfer(a, b, 10 * MB, lambda: seen.append(net.engine.now), tag="x")
    doomed = net.transfer(a, b, 10 * MB, lambda: seen.append(-1.0), tag="y")
    net.engine.schedule(1.0, lambda: net.cancel(doomed))  # it moved 5 MB by then
    net.engine.run()
    # 1 s at 5 MB/s, then 5 MB at 10 MB/s: 1.5 s, plus 30 ms latency
    assert seen == [pytest.approx(1.53)]
    stats = net.statistics()
    assert stats.bytes_by_tag == {"x": 10 * MB}
    assert stats.bytes_wasted == 5 * MB
    assert stats.flows_cancelled == 1 and stats.active == 0


def test_local_recomputation_never_oversubscribes_and_tracks_exact() -> None:
    """Random many-to-many transfers: every flow completes, no link beats its capacity
    (a host's bytes cannot arrive faster than its downlink allows), and the local model's
    total time stays close to exact max-min."""
    makespans = []
    for exact in (False, True):
        rng = random.Random(3)
        net = Network(Engine(seed=1), exact=exact)
        names = [f"h{i}" for i in range(30)]
        for name in names:
            net.add_host(name, up=rng.uniform(10, 100) * MB, down=rng.uniform(10, 100) * MB)
        flows = []
        for _ in range(300):
            src, dst = rng.sample(names, 2)
            flows.append((src, dst, rng.randint(1, 20) * MB))
        done = _finish_times(net, flows)
        assert min(done) > 0
        for name in names:
            received = sum(size for _, dst, size in flows if dst == name)
            last = max((d for (_, dst, _), d in zip(flows, done, strict=True) if dst == name),
                       default=0.0)
            assert received <= net.hosts[name].down.capacity * last * (1 + 1e-9)
        assert net.statistics().bytes_started == sum(size for *_, size in flows)
        makespans.append(max(done))
    local, exact_time = makespans
    assert exact_time * 0.9 <= local <= exact_time * 1.1


@pytest.mark.parametrize("exact", [False, True])
def test_a_flow_that_slows_down_finishes_on_time(exact: bool) -> None:
    # Finish timers are rescheduled lazily: a flow that slows down keeps its early timer,
    # which re-arms when it fires. 100 MB alone at 100 MB/s for 0.5 s (50 MB), then
    # shared at 50 MB/s: done at 1.5 s, not at the 1 s its first timer said.
    engine = Engine(seed=1)
    net = Network(engine, exact=exact)
    net.add_host("a", up=100 * MB)
    net.add_host("b", up=1, down=1000 * MB)
    net.add_host("c", up=1, down=1000 * MB)
    done: dict[str, float] = {}
    net.transfer(net.hosts["a"], net.hosts["b"], 100 * MB,
                 lambda: done.setdefault("b", engine.now), tag="a")
    engine.schedule(0.5, lambda: net.transfer(net.hosts["a"], net.hosts["c"], 100 * MB,
                                              lambda: done.setdefault("c", engine.now),
                                              tag="a"))
    engine.run()
    assert done["b"] == pytest.approx(1.5) and done["c"] == pytest.approx(2.0)


def test_on_sent_runs_when_the_last_byte_leaves_on_done_when_it_arrives() -> None:
    net = Network(Engine(seed=1))
    a = net.add_host("a", up=10 * MB, latency=0.01)
    b = net.add_host("b", up=1, down=100 * MB, latency=0.02)
    seen: list[tuple[str, float]] = []
    net.transfer(a, b, 10 * MB, lambda: seen.append(("done", net.engine.now)), tag="x",
                 on_sent=lambda: seen.append(("sent", net.engine.now)))
    net.engine.run()
    assert seen == [("sent", pytest.approx(1.0)), ("done", pytest.approx(1.03))]


def test_a_connection_sends_its_transfers_back_to_back_at_its_rate() -> None:
    # a -> b carries three 10 MB transfers one after another while a -> c shares a's
    # uplink: each gets 10 MB/s throughout (no rate changes between transfers), a's
    # bytes arrive 0.01 s after they leave.
    net = Network(Engine(seed=1))
    a = net.add_host("a", up=20 * MB, latency=0.005)
    b = net.add_host("b", up=1, down=100 * MB, latency=0.005)
    c = net.add_host("c", up=1, down=100 * MB)
    seen: list[tuple[str, float]] = []
    queue = [2, 3]

    def more() -> tuple[int, Callable[[], None]] | None:
        if not queue:
            return None
        k = queue.pop(0)
        return 10 * MB, lambda: seen.append((f"done {k}", net.engine.now))

    net.transfer(a, b, 10 * MB, lambda: seen.append(("done 1", net.engine.now)), tag="x",
                 on_sent=lambda: seen.append(("sent", net.engine.now)), more=more)
    net.transfer(a, c, 40 * MB, lambda: seen.append(("c", net.engine.now)), tag="y")
    net.engine.run()
    assert seen == [("sent", pytest.approx(1.0)), ("done 1", pytest.approx(1.01)),
                    ("sent", pytest.approx(2.0)), ("done 2", pytest.approx(2.01)),
                    ("sent", pytest.approx(3.0)), ("done 3", pytest.approx(3.01)),
                    ("c", pytest.approx(3.505))]
    stats = net.statistics()
    assert stats.flows_started == stats.flows_completed == 4 and stats.active == 0
    assert stats.bytes_by_tag == {"x": 30 * MB, "y": 40 * MB}
    assert stats.recomputes == 2  # the two starts (one batch) and the connection's end


@pytest.mark.parametrize("seed", range(20))
def test_filling_by_scan_and_by_heap_give_the_same_rates(seed: int) -> None:
    """Small regions are filled by a scan, large ones with a heap: same rates, bit for
    bit (ties included: equal capacities and equal shares are common)."""
    rng = random.Random(seed)
    net = Network(Engine(seed=seed))
    capacities = [rng.choice([10.0, 20.0, 30.0, rng.uniform(1, 50)]) for _ in range(12)]
    hosts = [net.add_host(f"h{i}", up=c * MB, down=rng.choice([c, 2 * c, math.inf]) * MB)
             for i, c in enumerate(capacities)]
    flows = []
    for _ in range(rng.randrange(1, 60)):
        src, dst = rng.sample(hosts, 2)
        flows.append(net.transfer(src, dst, MB, lambda: None, tag="x"))
    for flow in flows[::3]:  # some rates frozen outside the region
        flow.rate = rng.uniform(0, 2) * MB
        flow.src.up.total += flow.rate
        flow.dst.down.total += flow.rate
    region = [f for f in flows if f not in flows[::3]] or flows
    scan = max_min_rates(region)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(network, "SCAN_LIMIT", 0)  # every region by heap
        heap = max_min_rates(region)
    assert scan == heap
    assert all(rate >= 0 for rate in scan)
