"""Whole runs: determinism, conservation, bounds, the baseline, and the real core classes."""

import json

import pytest

import p2pd.core.coordinator
import p2pd.core.scheduler
import simulations.node
from simulations.__main__ import main
from simulations.cluster import MiB, Scenario, kumar_ross_bound, run_direct, run_p2p

SMALL = Scenario(nodes=12, image_bytes=48 * MiB, layers=2, node_up=40 * MiB,
                 node_down=80 * MiB, registry_up=40 * MiB, seed=5)


def test_same_seed_same_run() -> None:
    a, b = run_p2p(SMALL), run_p2p(SMALL)
    assert a.completion == b.completion
    assert a.bytes_by_source == b.bytes_by_source
    assert a.scheduler == b.scheduler and a.events == b.events
    c = run_p2p(Scenario(**{**_fields(SMALL), "seed": 6}))
    assert c.completion != a.completion


def _fields(scenario: Scenario) -> dict[str, object]:
    return {name: getattr(scenario, name) for name in scenario.__dataclass_fields__}


def test_bytes_are_conserved_and_the_registry_sends_one_copy() -> None:
    result = run_p2p(SMALL)
    assert len(result.completion) == SMALL.nodes
    # every flow started was delivered (nothing is cancelled: the daemon ignores cancels)
    assert sum(result.bytes_by_source.values()) == result.bytes_started
    # each node got the image exactly once, plus the copies that arrived when the piece
    # was already held (endgame duplicates; all pieces here are 1 MiB)
    useful = SMALL.nodes * SMALL.image_bytes
    assert result.bytes_started == useful + result.scheduler["redundant"] * MiB
    assert SMALL.image_bytes <= result.registry_bytes <= 1.1 * SMALL.image_bytes
    assert result.coordinator["leases_granted"] >= SMALL.layers


def test_no_run_beats_the_kumar_ross_bound() -> None:
    for scenario in (SMALL, Scenario(**{**_fields(SMALL), "node_up": 10 * MiB, "seed": 9})):
        result = run_p2p(scenario)
        assert result.bound == kumar_ross_bound(scenario)
        assert result.makespan >= result.bound
        assert result.ratio < 4  # loose: a regression guard, not a target


def test_direct_baseline_is_bounded_by_registry_egress() -> None:
    scenario = Scenario(nodes=40, image_bytes=64 * MiB, layers=4, node_up=100 * MiB,
                        node_down=100 * MiB, registry_up=50 * MiB, seed=1)
    result = run_direct(scenario)
    floor = scenario.nodes * scenario.image_bytes / scenario.registry_up
    assert result.registry_bytes == scenario.nodes * scenario.image_bytes
    assert floor <= result.makespan <= floor * 1.03
    assert result.makespan >= result.bound


def test_the_simulation_runs_the_real_core(monkeypatch: pytest.MonkeyPatch) -> None:
    assert simulations.node.Scheduler is p2pd.core.scheduler.Scheduler
    assert simulations.node.Coordinator is p2pd.core.coordinator.Coordinator
    calls: dict[str, int] = {}

    def count(cls: type, name: str) -> None:
        real = getattr(cls, name)

        def wrapper(self: object, *args: object, **kwargs: object) -> object:
            calls[name] = calls.get(name, 0) + 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for name in ("peer_update", "piece_received", "upstream_received", "next_actions",
                 "set_upstream_range", "tick"):
        count(p2pd.core.scheduler.Scheduler, name)
    for name in ("announce", "lookup", "request_lease"):
        count(p2pd.core.coordinator.Coordinator, name)
    result = run_p2p(Scenario(**{**_fields(SMALL), "nodes": 4}))
    assert set(calls) == {"peer_update", "piece_received", "upstream_received",
                          "next_actions", "set_upstream_range", "tick", "announce",
                          "lookup", "request_lease"}
    # every piece came through the scheduler: 24 one-MiB pieces per blob
    assert calls["upstream_received"] == result.bytes_by_source["registry"] // MiB
    assert calls["piece_received"] == result.bytes_by_source["peer"] // MiB


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--nodes", "5", "--image-mb", "16", "--layers", "2", "--node-up", "20",
            "--node-down", "40", "--registry", "20", "--seed", "3", "--json"]
    assert main(argv) == 0
    runs = json.loads(capsys.readouterr().out)
    assert sorted(runs) == ["direct", "p2p", "spegel"]  # the baselines in the same run
    data = runs["p2p"]
    assert data["nodes"] == 5 and data["mode"] == "p2p"
    assert data["max"] >= data["bound"] and data["ratio"] == data["max"] / data["bound"]
    assert runs["direct"]["registry_copies"] == 5  # every node from the registry
    assert main([*argv[:-1], "--baseline", "direct"]) == 0
    assert "mode direct" in capsys.readouterr().out
