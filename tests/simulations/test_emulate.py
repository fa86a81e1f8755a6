"""The emulation harness end to end: real daemons, registry and containerd in namespaces.

One small p2p emulation (3 nodes, a 24 MiB image in 2 layers, 8 MiB/s caps) must finish
with every node's pull done, about one copy out of the registry, bytes from peers, and
no namespace left behind; plus the ifb ingress cap on its own, the CLI's flags, and the
validation table's arithmetic.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from p2pd.lab.netns import IFB_IFACE, Lan, NetnsError, netns_unavailable
from p2pd.lab.procs import missing_bins
from simulations.cluster import MiB, Result, Scenario
from simulations.emulab import go_duration, unpack_seconds
from simulations.emulate import BINARIES, Emulation, emulate, main_emulate
from simulations.validate import Row, Validation, format_validation, scenarios

pytestmark = pytest.mark.e2e

SMALL = Scenario(nodes=3, image_bytes=24 * MiB, layers=2, node_up=8 * MiB,
                 node_down=8 * MiB, registry_up=8 * MiB, seed=3)


def require_lab() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"netns lab: {reason}")
    missing = missing_bins(*BINARIES)
    if missing:
        pytest.skip(f"e2e: required executables not installed: {', '.join(missing)}")


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.timeout(90)
def test_three_nodes_pull_through_their_daemons_and_nothing_is_left(tmp_path: Path) -> None:
    require_lab()
    lines: list[str] = []
    emulation = emulate(SMALL, workdir=tmp_path / "emu", log=lines.append, timeout=45)
    result = emulation.result
    print("\n" + "\n".join(lines) + f"\n{result.summary()}\n{emulation}")
    assert result.mode == "emulation-p2p" and result.nodes == 3 and result.events == 0
    assert len(result.completion) == 3 and list(result.completion) == sorted(result.completion)
    assert all(0 < t <= result.wall for t in result.completion)
    # About one copy left the registry (plus manifests, access checks and headers) ...
    assert SMALL.image_bytes <= result.registry_bytes <= 1.1 * SMALL.image_bytes
    # ... and the other nodes took theirs from peers.
    assert result.bytes_by_source["peer"] > 0
    assert result.bytes_by_source["registry"] <= 1.1 * SMALL.image_bytes
    assert result.bytes_started == sum(result.bytes_by_source.values())
    assert result.bound == pytest.approx(3.0)  # 24 MiB over 8 MiB/s
    assert emulation.ingress in ("ifb", "bridge") and emulation.pull.startswith("ctr images pull")
    assert all(rx >= SMALL.image_bytes for rx in emulation.node_rx)
    # each ctr said how long it unpacked (what --unpack models), and it took a while
    assert len(emulation.unpack) == 3 and all(0 < t < result.wall for t in emulation.unpack)
    # Every namespace of the run is gone.
    assert len(emulation.namespaces) == 1 + 1 + 3  # bridge, registry, nodes
    assert not set(emulation.namespaces) & set(namespaces().split())


def test_ifb_caps_ingress_inside_the_node(tmp_path: Path) -> None:
    require_lab()
    with Lan(tmp_path / "lan") as lan:
        node = lan.add_node("a")
        try:
            node.limit(8 * MiB, ingress=4 * MiB, ingress_via="ifb")
        except NetnsError as exc:
            pytest.skip(f"no ifb here: {exc}")
        shown = node.run(["tc", "qdisc", "show"]).stdout
        assert f"dev {IFB_IFACE} root" in shown and "tbf" in shown and "ingress" in shown
        node.limit(8 * MiB, ingress=4 * MiB, ingress_via="bridge")  # switches over
        links = json.loads(node.run(["ip", "-j", "link", "show"]).stdout)
        assert IFB_IFACE not in [link["ifname"] for link in links]
        node.unlimit()
        assert "tbf" not in node.run(["tc", "qdisc", "show"]).stdout


def test_the_cli_takes_the_run_flags_and_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main_emulate(["--help"])
    out = capsys.readouterr().out
    for flag in ("--nodes", "--image-mb", "--node-up", "--registry", "--baseline",
                 "--fetch-only", "--json"):
        assert flag in out


def _result(mode: str, completion: tuple[float, ...]) -> Result:
    return Result(mode=mode, nodes=len(completion), image_bytes=SMALL.image_bytes,
                  completion=completion, registry_bytes=SMALL.image_bytes,
                  bytes_by_source={"registry": SMALL.image_bytes}, bytes_started=0,
                  bound=3.0, events=0, wall=completion[-1])


def test_a_row_agrees_when_p50_and_max_are_both_within_the_tolerance() -> None:
    emulated = _result("emulation-p2p", (4.0, 5.0, 6.0))
    emulation = Emulation(result=emulated, ingress="ifb", pull="ctr images pull", setup=1.0,
                          teardown=0.5, starts=(0.0, 0.0, 0.0), node_rx=(1, 1, 1),
                          cpu={"p2pd": 1.0}, load=0.2, busy=0.3, namespaces=())
    close = Row(SMALL, (emulation,), (_result("p2p", (4.0, 5.5, 6.6)),))
    assert close.ratio(0.5) == pytest.approx(1.1) and close.agrees()
    assert not Row(SMALL, (emulation,), (_result("p2p", (4.0, 5.0, 7.0)),)).agrees()  # max 1.17
    validation = Validation((close,), 0.15, 12.0)
    assert validation.agrees and validation.summary()["rows"][0]["agrees"]  # type: ignore[index]
    table = format_validation(validation)
    assert "1 of 1 rows within 15%" in table and "ifb" in table


def test_a_row_compares_the_medians_of_its_runs_and_seeds() -> None:
    def emulated(*completion: float) -> Emulation:
        return Emulation(result=_result("emulation-p2p", completion), ingress="ifb",
                         pull="ctr images pull", setup=1.0, teardown=0.5,
                         starts=(0.0,) * len(completion), node_rx=(1,) * len(completion),
                         cpu={"p2pd": 1.0}, load=0.2, busy=0.3, namespaces=())

    # one emulated run was slow (p50 9): the median run is the middle one
    runs = (emulated(4.0, 5.0, 6.0), emulated(8.0, 9.0, 10.0), emulated(3.0, 4.0, 5.0))
    seeds = tuple(_result("p2p", (4.0, p50, 6.0)) for p50 in (5.6, 4.4, 5.2, 5.4, 4.8))
    row = Row(SMALL, runs, seeds)
    assert row.emulated(0.5) == 5.0 and row.simulated(0.5) == 5.2
    assert row.emulated(1.0) == 6.0 and row.simulated(1.0) == 6.0
    assert row.agrees() and not Row(SMALL, runs[1:2], seeds).agrees()
    figures = row.summary()["p50"]
    assert figures["emulated_runs"] == [5.0, 9.0, 4.0]  # type: ignore[index]
    assert figures["simulated_seeds"] == [5.6, 4.4, 5.2, 5.4, 4.8]  # type: ignore[index]
    assert "median of 3 emulated run(s) and of 5 simulated seed(s)" in format_validation(
        Validation((row,), 0.15, 1.0))
    with pytest.raises(ValueError):
        Row(SMALL, (), seeds)
    assert [s.nodes for s in scenarios((4, 8), (32.0,))] == [4, 8]


def test_what_cannot_be_emulated_is_refused_before_anything_starts() -> None:
    from dataclasses import replace

    from simulations.emulate import EmulationError, unsupported
    from simulations.node import Limits

    assert unsupported(SMALL) == []
    odd = replace(SMALL, arrival="rolling", failures=1, limits=Limits(piece_size=MiB))
    assert len(unsupported(odd)) == 3
    with pytest.raises(EmulationError, match="cannot emulate"):
        emulate(odd, log=lambda line: None)


def test_ctr_unpack_times_are_read_from_its_output() -> None:
    assert go_duration("284.489083ms") == pytest.approx(0.284489083)
    assert go_duration("1m2.5s") == pytest.approx(62.5)
    assert go_duration("850µs") == pytest.approx(850e-6)
    for bad in ("", "12", "1.5x", "s", "1s trailing"):
        with pytest.raises(ValueError):
            go_duration(bad)
    log = ("layer-sha256:abc:    done           |++++|\nelapsed: 0.9 s    total:  62.0 M\n"
           "unpacking linux/amd64 sha256:08d0...\ndone: 1.25s\t\n")
    assert unpack_seconds(log) == pytest.approx(1.25)
    assert unpack_seconds("elapsed: 0.9 s\ndone: 3s\n") is None  # fetched, never unpacked
    assert unpack_seconds(log.replace("done: 1.25s", "ctr: failed")) is None
