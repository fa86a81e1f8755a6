"""``python -m simulations run ...``: simulate one cold pull of an image by a cluster.

Sizes are MiB and rates MiB/s. Prints per-node completion percentiles, registry egress,
bytes by source, the Kumar-Ross lower bound and the ratio of the makespan to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from simulations.cluster import MiB, Result, Scenario, run_direct, run_p2p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="simulate every node pulling one image at once")
    run.add_argument("--nodes", type=int, required=True)
    run.add_argument("--image-mb", type=float, required=True, help="image size, MiB")
    run.add_argument("--layers", type=int, default=4)
    run.add_argument("--node-up", type=float, required=True, help="node upload, MiB/s")
    run.add_argument("--node-down", type=float, required=True, help="node download, MiB/s")
    run.add_argument("--registry", type=float, required=True, help="registry egress, MiB/s")
    run.add_argument("--latency", type=float, default=0.5, help="one-way link latency, ms")
    run.add_argument("--registry-latency", type=float, default=20.0,
                     help="registry time to answer a request, ms")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--baseline", choices=["direct"], default=None,
                     help="instead of p2p: every node pulls from the registry")
    run.add_argument("--exact", action="store_true", help="exact max-min rates (slow)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def scenario_from(args: argparse.Namespace) -> Scenario:
    """The scenario the parsed arguments describe."""
    return Scenario(
        nodes=args.nodes, image_bytes=round(args.image_mb * MiB), layers=args.layers,
        node_up=args.node_up * MiB, node_down=args.node_down * MiB,
        registry_up=args.registry * MiB, latency=args.latency / 1000,
        registry_latency=args.registry_latency / 1000, seed=args.seed, exact=args.exact,
    )


def format_result(result: Result) -> str:
    """A short human-readable report of ``result``."""
    lines = [
        f"mode {result.mode}: {result.nodes} nodes, image {result.image_bytes / MiB:.1f} MiB",
        " ".join(["completion s:", *(f"{label} {value:.3f}" for label, value in (
            ("p50", result.percentile(0.5)), ("p90", result.percentile(0.9)),
            ("p99", result.percentile(0.99)), ("max", result.makespan)))]),
        f"registry egress: {result.registry_bytes / MiB:.1f} MiB "
        f"({result.registry_bytes / result.image_bytes:.3f} x image)",
        "bytes by source: " + ", ".join(
            f"{tag} {n / MiB:.1f} MiB" for tag, n in result.bytes_by_source.items()),
        f"Kumar-Ross bound: {result.bound:.3f} s; max / bound = {result.ratio:.3f}",
        f"events {result.events}, wall {result.wall:.2f} s",
    ]
    if result.scheduler:
        lines.append("scheduler: " + ", ".join(f"{k} {v}" for k, v in result.scheduler.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run, print; the exit status."""
    args = _parser().parse_args(argv)
    scenario = scenario_from(args)
    result = run_direct(scenario) if args.baseline == "direct" else run_p2p(scenario)
    if args.json:
        print(json.dumps(result.summary(), sort_keys=True))
    else:
        print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
