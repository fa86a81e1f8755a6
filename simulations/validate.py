"""``python -m simulations validate``: the simulator against real daemons, side by side.

How it works. For every node count and image size asked for (by default N = 4, 8, 16
and 32 and 64 MiB), one :class:`~simulations.cluster.Scenario` is run twice: emulated
with real daemons (:func:`simulations.emulate.emulate`, p2p mode) and simulated
(:func:`simulations.cluster.run_p2p`); ``--direct`` adds the same pair for the direct
baseline (:func:`~simulations.cluster.run_direct`), which checks the emulated network
against the simulated one without the daemons in the way. A :class:`Row` holds both
results; it agrees when the simulated p50 and max completion times are each within
``tolerance`` (15 %) of the emulated ones. The table gives both, their ratio (simulated /
emulated), the registry egress of each, and the CPU share of the lab's processes and of
the whole machine during the pulls.

The emulation cannot delay packets (no ``netem`` here), so the scenarios describe the
lan as it is: ``latency`` 0.05 ms one way and ``registry_latency`` 2 ms (a local
``docker-registry`` answering), unless told otherwise. The default caps (node 4 MiB/s up
and down, registry 8 MiB/s) keep 4 and 8 nodes network-bound on 2 CPUs; at 16 nodes the
daemons alone use about one CPU, so read those rows with the CPU columns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from simulations.cluster import MiB, Result, Scenario, run_direct, run_p2p
from simulations.emulab import EmulationError, Log
from simulations.emulate import Emulation, emulate

__all__ = ["Row", "Validation", "add_validate_parser", "run_validation", "scenarios",
           "validate_command"]

TOLERANCE = 0.15
NODES = (4, 8, 16)
IMAGES_MB = (32.0, 64.0)


@dataclass(frozen=True, slots=True)
class Row:
    """One scenario, emulated and simulated."""

    scenario: Scenario
    emulation: Emulation
    simulated: Result
    mode: str = "p2p"

    @property
    def emulated(self) -> Result:
        """The emulation's figures."""
        return self.emulation.result

    def ratio(self, q: float) -> float:
        """Simulated over emulated completion at quantile ``q`` (1.0: the max)."""
        return self.simulated.percentile(q) / self.emulated.percentile(q)

    def agrees(self, tolerance: float = TOLERANCE) -> bool:
        """Whether p50 and max are both within ``tolerance`` of the emulation's."""
        return all(abs(self.ratio(q) - 1) <= tolerance for q in (0.5, 1.0))

    def summary(self, tolerance: float = TOLERANCE) -> dict[str, object]:
        """The row's figures (JSON-ready)."""
        emu, sim, sc = self.emulated, self.simulated, self.scenario
        return {
            "mode": self.mode, "nodes": sc.nodes, "image_bytes": sc.image_bytes,
            "layers": sc.layers,
            "p50": {"emulated": emu.percentile(0.5), "simulated": sim.percentile(0.5),
                    "ratio": self.ratio(0.5)},
            "max": {"emulated": emu.makespan, "simulated": sim.makespan,
                    "ratio": self.ratio(1.0)},
            "registry_bytes": {"emulated": emu.registry_bytes,
                               "simulated": sim.registry_bytes},
            "bytes_by_source": {"emulated": emu.bytes_by_source,
                                "simulated": sim.bytes_by_source},
            "bound": sim.bound, "agrees": self.agrees(tolerance),
            "emulation": self.emulation.summary()["emulation"],
        }


@dataclass(frozen=True, slots=True)
class Validation:
    """Every row, the tolerance, and how long the whole run took."""

    rows: tuple[Row, ...]
    tolerance: float
    wall: float

    @property
    def agrees(self) -> bool:
        """Whether every row agrees."""
        return all(row.agrees(self.tolerance) for row in self.rows)

    def summary(self) -> dict[str, object]:
        """Everything, JSON-ready."""
        return {"tolerance": self.tolerance, "wall": self.wall, "agrees": self.agrees,
                "rows": [row.summary(self.tolerance) for row in self.rows]}


def scenarios(nodes: Sequence[int] = NODES, images_mb: Sequence[float] = IMAGES_MB, *,
              layers: int = 4, node_up: float = 4 * MiB, node_down: float = 4 * MiB,
              registry_up: float = 8 * MiB, latency: float = 0.00005,
              registry_latency: float = 0.002, seed: int = 0) -> list[Scenario]:
    """One scenario per node count and image size (rates in bytes/s, times in s)."""
    return [Scenario(nodes=n, image_bytes=round(mb * MiB), layers=layers, node_up=node_up,
                     node_down=node_down, registry_up=registry_up, latency=latency,
                     registry_latency=registry_latency, seed=seed)
            for mb in images_mb for n in nodes]


def run_validation(scenario_list: Sequence[Scenario], *, workdir: Path | None = None,
                   log: Log = print, fetch_only: bool = False,
                   tolerance: float = TOLERANCE,
                   modes: Sequence[str] = ("p2p",)) -> Validation:
    """Emulate and simulate every scenario in every mode in turn (see the module)."""
    began, rows = time.monotonic(), []
    runs = [(scenario, mode) for scenario in scenario_list for mode in modes]
    for k, (scenario, mode) in enumerate(runs):
        log(f"[{k + 1}/{len(runs)}] {mode}: {scenario.nodes} nodes, "
            f"{scenario.image_bytes / MiB:.0f} MiB in {scenario.layers} layers")
        emulation = emulate(scenario, log=log, fetch_only=fetch_only, mode=mode,
                            workdir=None if workdir is None else workdir / f"run{k}")
        simulated = run_p2p(scenario) if mode == "p2p" else run_direct(scenario)
        rows.append(Row(scenario, emulation, simulated, mode))
        log("  " + _line(rows[-1], tolerance))
    return Validation(tuple(rows), tolerance, time.monotonic() - began)


def _line(row: Row, tolerance: float) -> str:
    emu, sim, sc = row.emulated, row.simulated, row.scenario
    return (f"{row.mode:>6} {sc.nodes:>3} {sc.image_bytes / MiB:>5.0f} | "
            f"{emu.percentile(0.5):7.2f} {sim.percentile(0.5):7.2f} {row.ratio(0.5):5.2f} | "
            f"{emu.makespan:7.2f} {sim.makespan:7.2f} {row.ratio(1.0):5.2f} | "
            f"{emu.registry_bytes / sc.image_bytes:5.2f} "
            f"{sim.registry_bytes / sc.image_bytes:5.2f} | {sim.bound:6.2f} | "
            f"{row.emulation.load:4.0%} {row.emulation.busy:4.0%} | "
            f"{'yes' if row.agrees(tolerance) else 'NO'}")


def format_validation(validation: Validation) -> str:
    """The side-by-side table, and whether every row agrees."""
    rows = validation.rows
    first = rows[0].scenario if rows else None
    lines = []
    if first is not None:
        lines.append(f"caps: node up {first.node_up / MiB:g} MiB/s, down "
                     f"{first.node_down / MiB:g} MiB/s, registry {first.registry_up / MiB:g} "
                     f"MiB/s; {first.layers} layers; simulated latency "
                     f"{first.latency * 1000:g} ms, registry latency "
                     f"{first.registry_latency * 1000:g} ms; emulation pulls with "
                     f"`{rows[0].emulation.pull}`, ingress via {rows[0].emulation.ingress}")
    lines += [
        "  mode   N   MiB |   p50 s: emu     sim ratio |   max s: emu     sim ratio | "
        "egress xF: emu sim | bound | CPU lab all | within",
        *(_line(row, validation.tolerance) for row in rows),
        f"{sum(r.agrees(validation.tolerance) for r in rows)} of {len(rows)} rows within "
        f"{validation.tolerance:.0%} (p50 and max); validate wall {validation.wall:.0f} s",
    ]
    return "\n".join(lines)


def add_validate_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``validate`` subcommand to ``commands``."""
    parser = commands.add_parser(
        "validate", help="emulation (real daemons, root) and simulation side by side",
        description="For each node count and image size, emulate with real p2pd daemons "
        "and simulate the same scenario; compare p50 and max completion.")
    parser.add_argument("--nodes", type=int, nargs="+", default=list(NODES))
    parser.add_argument("--image-mb", type=float, nargs="+", default=list(IMAGES_MB),
                        help="image sizes, MiB")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--node-up", type=float, default=4.0, help="node upload, MiB/s")
    parser.add_argument("--node-down", type=float, default=4.0, help="node download, MiB/s")
    parser.add_argument("--registry", type=float, default=8.0, help="registry egress, MiB/s")
    parser.add_argument("--latency", type=float, default=0.05,
                        help="one-way link latency the simulation assumes, ms")
    parser.add_argument("--registry-latency", type=float, default=2.0,
                        help="registry time to answer that the simulation assumes, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--fetch-only", action="store_true",
                        help="ctr content fetch (no unpacking) instead of ctr images pull")
    parser.add_argument("--direct", action="store_true",
                        help="also compare the direct baseline (every node from the registry)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep each run's logs under DIR/runK")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=validate_command)
    return parser


def validate_command(args: argparse.Namespace) -> int:
    """Run the parsed ``validate`` command; 0 if every row agrees, 1 if not, 2 on error."""
    chosen = scenarios(args.nodes, args.image_mb, layers=args.layers,
                       node_up=args.node_up * MiB, node_down=args.node_down * MiB,
                       registry_up=args.registry * MiB, latency=args.latency / 1000,
                       registry_latency=args.registry_latency / 1000, seed=args.seed)
    log: Log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        validation = run_validation(chosen, workdir=args.workdir, log=log,
                                    fetch_only=args.fetch_only, tolerance=args.tolerance,
                                    modes=("p2p", "direct") if args.direct else ("p2p",))
    except EmulationError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(validation.summary(), sort_keys=True))
    else:
        print(format_validation(validation))
    return 0 if validation.agrees else 1


def main_validate(argv: list[str] | None = None) -> int:
    """``python -m simulations.validate ARGV...`` (without ``__main__`` wiring)."""
    parser = argparse.ArgumentParser(prog="python -m simulations")
    add_validate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    return validate_command(args)


if __name__ == "__main__":
    sys.exit(main_validate())
