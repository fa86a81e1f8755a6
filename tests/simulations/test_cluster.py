"""Whole runs: determinism, conservation, bounds, the baseline, and the real core classes."""

import gc
import json
from dataclasses import replace
from pathlib import Path

import pytest

import p2pd.core.coordinator
import p2pd.core.scheduler
import simulations.cluster
import simulations.node
from simulations.cli import main
from simulations.cluster import (
    Cluster,
    MiB,
    Progress,
    Scenario,
    kumar_ross_bound,
    run_direct,
    run_p2p,
    run_spegel,
)
from simulations.report import (
    plot_cdf,
    plot_egress,
    plot_sweep,
    run_study,
    save_study,
    study_sweeps,
)
from simulations.scenarios import STUDIES

SMALL = Scenario(nodes=12, image_bytes=48 * MiB, layers=2, node_up=40 * MiB,
                 node_down=80 * MiB, registry_up=40 * MiB, seed=5)


def test_same_seed_same_run() -> None:
    a, b = run_p2p(SMALL), run_p2p(SMALL)
    assert a.completion == b.completion
    assert a.bytes_by_source == b.bytes_by_source
    assert a.scheduler == b.scheduler and a.events == b.events
    c = run_p2p(Scenario(**{**_fields(SMALL), "seed": 6}))
    assert c.completion != a.completion


def test_progress_reports_leave_the_run_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulations.cluster, "PROGRESS_EVERY", 0.0)  # report every slice
    seen: list[Progress] = []
    reported = run_p2p(SMALL, seen.append)
    plain = run_p2p(SMALL)
    assert reported.completion == plain.completion and reported.events == plain.events
    assert reported.scheduler == plain.scheduler
    assert len(seen) > 10
    assert [p.simulated for p in seen] == sorted(p.simulated for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[0].done == 0 and seen[-1].done == seen[-1].live == SMALL.nodes
    assert seen[-1].events == plain.events


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

    for name in ("peer_update", "peer_update_bits", "piece_received", "upstream_received",
                 "next_actions", "set_upstream_range", "tick"):
        count(p2pd.core.scheduler.Scheduler, name)
    for name in ("announce", "lookup", "request_lease"):
        count(p2pd.core.coordinator.Coordinator, name)
    result = run_p2p(Scenario(**{**_fields(SMALL), "nodes": 4}))
    assert set(calls) == {"peer_update", "peer_update_bits", "piece_received", "upstream_received",
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


def test_spegel_like_gains_nothing_when_all_start_at_once_and_helps_a_rolling_update() -> None:
    at_once = Scenario(nodes=10, image_bytes=40 * MiB, layers=2, node_up=100 * MiB,
                       node_down=100 * MiB, registry_up=20 * MiB, seed=2)
    direct, spegel = run_direct(at_once), run_spegel(at_once)
    assert spegel.completion == direct.completion  # nothing complete to share yet
    assert spegel.registry_bytes == direct.registry_bytes == 10 * at_once.image_bytes
    rolling = replace(at_once, arrival="rolling", batch=0.2)
    direct, spegel, p2p = run_direct(rolling), run_spegel(rolling), run_p2p(rolling)
    assert spegel.registry_bytes == 2 * rolling.image_bytes  # only the first batch
    assert spegel.makespan < direct.makespan
    assert p2p.registry_bytes < 1.1 * rolling.image_bytes  # shares while downloading


def test_rolling_batches_start_when_the_previous_batch_is_done() -> None:
    scenario = replace(SMALL, arrival="rolling", batch=0.25)
    result = run_p2p(scenario)
    assert len(result.completion) == scenario.nodes
    # 4 batches of 3, one after the other: all done takes at least 4 pulls' time
    assert result.makespan >= 4 * result.completion[0]
    direct = run_direct(scenario)
    assert direct.makespan >= 4 * direct.completion[0] * 0.999


def test_staggered_starts_and_the_bound_that_follows() -> None:
    scenario = replace(SMALL, arrival="staggered", stagger=0.5)
    result = run_p2p(scenario)
    last_start = (scenario.nodes - 1) * 0.5
    assert result.makespan >= last_start
    assert result.bound >= last_start + scenario.image_bytes / scenario.down
    assert result.makespan >= result.bound


@pytest.mark.parametrize("fail_at", [0.3, 1.0])
def test_crashed_nodes_never_stop_the_others(fail_at: float) -> None:
    scenario = replace(SMALL, failures=3, fail_at=fail_at)
    result = run_p2p(scenario)
    assert result.failed == 3 and len(result.completion) == scenario.nodes - 3
    baseline = run_direct(scenario)
    assert len(baseline.completion) == scenario.nodes - 3


def test_disk_caps_a_node_like_its_link() -> None:
    capped = replace(SMALL, disk=20 * MiB)
    assert capped.up == capped.down == 20 * MiB
    assert run_p2p(capped).makespan > run_p2p(SMALL).makespan


def test_unpacking_follows_the_fetch_on_the_nodes_cpu() -> None:
    alone = replace(SMALL, nodes=1, layers=1)
    fetched = run_direct(alone).makespan
    unpacked = run_direct(replace(alone, unpack=12 * MiB))
    assert unpacked.makespan == pytest.approx(fetched + alone.image_bytes / (12 * MiB))
    assert unpacked.bytes_by_source == {"registry": alone.image_bytes}  # not traffic
    assert unpacked.bound == pytest.approx(run_direct(alone).bound
                                           + alone.image_bytes / (12 * MiB))


def test_nodes_sharing_cores_unpack_in_turn() -> None:
    # four nodes, one layer each from a registry fast enough for all: they have the
    # image at the same instant, then unpack on one shared core at a quarter speed each
    four = replace(SMALL, nodes=4, layers=1, registry_up=4 * SMALL.node_down)
    fetched = run_direct(four).makespan
    each_own = run_direct(replace(four, unpack=12 * MiB)).makespan
    shared = run_direct(replace(four, unpack=12 * MiB, shared_cores=1))
    assert each_own == pytest.approx(fetched + four.image_bytes / (12 * MiB))
    assert shared.makespan == pytest.approx(fetched + 4 * four.image_bytes / (12 * MiB))
    two_cores = run_direct(replace(four, unpack=12 * MiB, shared_cores=2)).makespan
    assert two_cores == pytest.approx(fetched + 2 * four.image_bytes / (12 * MiB))
    p2p = run_p2p(replace(SMALL, unpack=12 * MiB, shared_cores=2))
    assert p2p.makespan > run_p2p(SMALL).makespan
    assert sum(p2p.bytes_by_source.values()) == p2p.bytes_started  # unpacking not counted
    with pytest.raises(ValueError, match="shared_cores"):
        replace(SMALL, shared_cores=2)


def test_a_node_that_crashes_while_unpacking_is_not_done() -> None:
    scenario = replace(SMALL, unpack=2 * MiB)  # 24 s of unpacking after the fetch
    fetched = max(run_p2p(SMALL).makespan, run_direct(SMALL).makespan)
    crashing = replace(scenario, failures=3, fail_at=fetched + 1.0)
    for result in (run_p2p(crashing), run_direct(crashing)):
        assert result.failed == 3 and len(result.completion) == scenario.nodes - 3
        assert min(result.completion) > crashing.fail_at  # they were all unpacking


def test_plots_are_written(tmp_path: Path) -> None:
    results = {"p2p": run_p2p(SMALL), "direct": run_direct(SMALL)}
    plot_cdf(results, tmp_path / "cdf.png", "t")
    plot_egress(results, tmp_path / "egress.png", "t")
    plot_sweep({"p2p": [(4, 1.0), (8, 2.0)]}, tmp_path / "sweep.png", "t")
    for name in ("cdf.png", "egress.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the egress series grows to the registry bytes, never backwards
    for result in results.values():
        sent = [b for _, b in result.registry_series]
        assert sent == sorted(sent) and sent[-1] == pytest.approx(result.registry_bytes)


def test_a_study_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = STUDIES["hundred-nodes"]
    small = replace(study, cases=tuple(
        replace(c, scenario=replace(c.scenario, nodes=8, image_bytes=32 * MiB,
                                    layer_sizes=(16 * MiB, 16 * MiB)))
        for c in study.cases))
    rows = run_study(small)
    assert [r["mode"] for r in rows] == list(study.modes)
    save_study(small, rows, tmp_path)
    saved = json.loads((tmp_path / "hundred-nodes.json").read_text())
    assert saved["assumptions"] and len(saved["rows"]) == len(rows)
    assert "| 100 nodes, 1 GB | direct | 12 min |" in (tmp_path / "hundred-nodes.md").read_text()
    assert main(["list"]) == 0
    assert "kraken" in capsys.readouterr().out


def test_no_node_uploads_a_piece_it_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    uploads = []
    real = simulations.node.SimNode._upload

    def upload(self: simulations.node.SimNode, asker: simulations.node.SimNode,
               digest: str, index: int) -> None:
        uploads.append(self.held[digest] >> index & 1)
        real(self, asker, digest, index)

    monkeypatch.setattr(simulations.node.SimNode, "_upload", upload)
    result = run_p2p(replace(SMALL, failures=2, fail_at=0.5))
    assert uploads and all(uploads)
    assert result.bytes_by_source["peer"] > 0


def test_the_daemons_bandwidth_limits_cap_its_node() -> None:
    limited = replace(SMALL, limits=simulations.node.Limits(upload_limit=5 * MiB))
    assert limited.up == 5 * MiB and limited.down == SMALL.node_down
    assert run_p2p(limited).makespan > run_p2p(SMALL).makespan


def test_a_sweep_study_gives_simulated_and_published_series() -> None:
    rows = [{"nodes": n, "mode": "p2p", "image_bytes": 500_000_000, "max": float(n),
             "published": {"p2p": f"{n // 10} s", "direct": "12 min"}} for n in (50, 100)]
    series = study_sweeps(rows)
    assert series["500 MB p2p simulated"] == [(50, 50.0), (100, 100.0)]
    assert series["published 500 MB p2p"] == [(50, 5.0), (100, 10.0)]
    rows[0]["mode"] = "direct"
    assert study_sweeps(rows)["published 500 MB direct"] == [(50, 720.0)]


def test_a_run_leaves_no_reference_cycles() -> None:
    # The engine runs with the cyclic garbage collector off (see engine.py): whatever a
    # run leaves unreachable must be freed by reference counting alone. (The clusters
    # are kept: a cluster and its nodes refer to each other, and go with one collection
    # once the caller drops them.)
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        clusters = [Cluster(replace(SMALL, failures=2, fail_at=0.5)),
                    Cluster(replace(SMALL, arrival="rolling", batch=0.25))]
        for cluster in clusters:
            cluster.run()
        assert gc.collect() == 0
    finally:
        if collecting:
            gc.enable()


def test_cases_run_at_once_give_the_rows_of_cases_run_one_by_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    study = STUDIES["dragonfly-volcano"]
    small = replace(study, cases=tuple(
        replace(c, scenario=replace(c.scenario, nodes=3 + i, image_bytes=8 * MiB,
                                    layer_sizes=(), layers=2, seed=i))
        for i, c in enumerate(study.cases[:3])))
    saved: list[int] = []
    alone = run_study(small, jobs=1)
    together = run_study(small, done=lambda rows: saved.append(len(rows)), jobs=2)
    for row in (*alone, *together):
        del row["wall"]
    assert together == alone  # same figures, same order
    assert saved == [2, 4, 6]  # the rows so far, after each case, in order
    assert len({row["p50"] for row in alone}) > 1  # the cases differ
    assert main(["sweep", "--nodes-list", "3,5,4", "--image-mb", "8", "--layers", "2",
                 "--node-up", "20", "--node-down", "20", "--registry", "20", "--json",
                 "--jobs", "2"]) == 0
    series = json.loads(capsys.readouterr().out)
    assert [n for n, _ in series["p2p"]] == [3, 5, 4]
    assert main(["sweep", "--nodes-list", "3,5,4", "--image-mb", "8", "--layers", "2",
                 "--node-up", "20", "--node-down", "20", "--registry", "20", "--json",
                 "--jobs", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == series
