"""The commands of ``python -m simulations``: simulate cluster pulls, rerun published
studies, emulate.

- ``run --nodes N --image-mb M ...``: one scenario in p2pd and the baselines (direct,
  Spegel-like) on the same network; ``--plots DIR`` writes the pull-time CDF and the
  registry egress over time.
- ``list`` / ``run NAME``: the published studies (:mod:`simulations.scenarios`); results
  go to ``simulations/results/NAME.{json,md}``.
- ``sweep --nodes-list 50,100,...``: time until all are done against N, with a plot.
- ``emulate`` / ``validate``: real daemons in network namespaces (root), and the
  emulation beside the simulation.
- ``build``: compile the hot modules with mypyc (:mod:`simulations.compiled`); later
  runs load them (same results, about half the wall time).

Sizes are MiB and rates MiB/s on the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from p2pd.core.tuning import MAX_IN_FLIGHT, MAX_UPLOADS
from simulations import compiled
from simulations.cluster import ARRIVALS, MiB, Progress, Result, Scenario
from simulations.node import Limits
from simulations.report import (
    RESULTS_DIR,
    RUNNERS,
    default_jobs,
    plot_cdf,
    plot_egress,
    plot_sweep,
    run_many,
    run_modes,
    run_study,
    save_study,
    study_sweeps,
    study_table,
)
from simulations.scenarios import STUDIES, free_coordinators

LARGE_RUN = 1000  # nodes: from here on, say when the compiled build is not in use


def _scenario_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, help="how many nodes pull")
    parser.add_argument("--image-mb", type=float, help="image size, MiB")
    parser.add_argument("--layers", type=int, default=4, help="equal layers of the image")
    parser.add_argument("--layer-mb", type=float, nargs="+", default=None,
                        help="layer sizes, MiB (instead of --image-mb/--layers)")
    parser.add_argument("--node-up", type=float, help="node upload, MiB/s")
    parser.add_argument("--node-down", type=float, help="node download, MiB/s")
    parser.add_argument("--registry", type=float, help="registry egress, MiB/s")
    parser.add_argument("--disk", type=float, default=None,
                        help="node disk throughput, MiB/s (caps its upload and download)")
    parser.add_argument("--latency", type=float, default=0.5, help="one-way link latency, ms")
    parser.add_argument("--registry-latency", type=float, default=20.0,
                        help="registry time to answer a request, ms")
    parser.add_argument("--arrival", choices=ARRIVALS, default="all",
                        help="all at once, a rolling update in batches, or staggered")
    parser.add_argument("--batch", type=float, default=10.0,
                        help="rolling: percent of the nodes per batch")
    parser.add_argument("--stagger", type=float, default=1.0,
                        help="staggered: seconds between node starts")
    parser.add_argument("--unpack", type=float, default=None,
                        help="containerd unpacks the image after the fetch at this rate, "
                             "MiB/s on one core (default: not modelled)")
    parser.add_argument("--shared-cores", type=int, default=None,
                        help="with --unpack: all nodes share this many cores (one machine "
                             "emulating them all); default: each node its own")
    parser.add_argument("--failures", type=int, default=0, help="nodes that crash")
    parser.add_argument("--fail-at", type=float, default=1.0, help="when they crash, s")
    parser.add_argument("--piece-mb", type=float, default=None,
                        help="piece size, MiB (default: the daemon's rule)")
    parser.add_argument("--max-uploads", type=int, default=MAX_UPLOADS,
                        help="upload slots per daemon")
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                        help="piece requests a daemon keeps out")
    parser.add_argument("--upload-limit", type=float, default=None,
                        help="the daemon's --upload-limit, MiB/s")
    parser.add_argument("--download-limit", type=float, default=None,
                        help="the daemon's --download-limit, MiB/s")
    parser.add_argument("--layer-concurrency", type=int, default=Limits().layer_concurrency,
                        help="layers containerd pulls at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true", help="exact max-min rates (slow)")
    parser.add_argument("--free-coordinators", action="store_true",
                        help="coordinators answer at once, however many nodes ask (by "
                             "default each message costs its coordinator CPU time)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="split the p2p run's nodes between this many processes, "
                             "which exchange their messages every window of the "
                             "node-to-node latency (a different model: see "
                             "simulations/parallel.py); 1: one process, as before")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _parser() -> argparse.ArgumentParser:
    from simulations.emulate import add_emulate_parser
    from simulations.validate import add_validate_parser

    parser = argparse.ArgumentParser(prog="python -m simulations")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the published studies `run NAME` reruns")
    run = commands.add_parser("run", help="simulate a scenario, or a published study")
    run.add_argument("name", nargs="?", default=None, help="a study from `list`")
    _scenario_flags(run)
    run.add_argument("--modes", default=None,
                     help="comma-separated of p2p,direct,spegel (default: all three)")
    run.add_argument("--baseline", choices=["direct", "spegel"], default=None,
                     help="only this baseline instead of p2p")
    run.add_argument("--plots", type=Path, default=None,
                     help="write cdf.png and egress.png to this directory")
    run.add_argument("--progress", action="store_true",
                     help="report how far the p2p run got every 10 s of wall time (stderr)")
    run.add_argument("--results", type=Path, default=RESULTS_DIR,
                     help="where `run NAME` writes its results")
    run.add_argument("--case", default=None,
                     help="`run NAME`: only the cases whose label contains this text")
    run.add_argument("--jobs", type=int, default=default_jobs(),
                     help="`run NAME`: cases run at once, one process each (default: "
                          "one per core)")
    sweep = commands.add_parser("sweep", help="time until all are done against N")
    _scenario_flags(sweep)
    sweep.add_argument("--nodes-list", required=True, help="e.g. 10,30,100,300")
    sweep.add_argument("--modes", default="p2p,direct")
    sweep.add_argument("--plot", type=Path, default=None, help="write the plot here")
    sweep.add_argument("--jobs", type=int, default=default_jobs(),
                       help="values of N run at once, one process each (default: one per "
                            "core)")
    commands.add_parser("build", help="compile the simulation's hot modules (mypyc): "
                                      "same results, about half the wall time")
    add_emulate_parser(commands)
    add_validate_parser(commands)
    return parser


def scenario_from(args: argparse.Namespace, nodes: int | None = None) -> Scenario:
    """The scenario the parsed arguments describe."""
    missing = [flag for flag, value in (("--nodes", nodes or args.nodes),
                                        ("--node-up", args.node_up),
                                        ("--node-down", args.node_down),
                                        ("--registry", args.registry)) if value is None]
    if args.image_mb is None and not args.layer_mb:
        missing.append("--image-mb")
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}")
    layer_sizes = tuple(round(mb * MiB) for mb in args.layer_mb or ())
    limits = Limits(
        max_uploads=args.max_uploads, max_in_flight=args.max_in_flight,
        layer_concurrency=args.layer_concurrency,
        upload_limit=args.upload_limit * MiB if args.upload_limit else None,
        download_limit=args.download_limit * MiB if args.download_limit else None,
        piece_size=round(args.piece_mb * MiB) if args.piece_mb else None)
    return Scenario(
        nodes=nodes or args.nodes,
        image_bytes=sum(layer_sizes) if layer_sizes else round(args.image_mb * MiB),
        layers=args.layers, layer_sizes=layer_sizes,
        node_up=args.node_up * MiB, node_down=args.node_down * MiB,
        registry_up=args.registry * MiB, disk=args.disk * MiB if args.disk else None,
        latency=args.latency / 1000, registry_latency=args.registry_latency / 1000,
        arrival=args.arrival, batch=args.batch / 100, stagger=args.stagger,
        failures=args.failures, fail_at=args.fail_at, limits=limits,
        unpack=args.unpack * MiB if args.unpack else None, shared_cores=args.shared_cores,
        seed=args.seed, exact=args.exact, coordinator_cpu=not args.free_coordinators,
        partitions=args.partitions,
    )


def format_result(result: Result) -> str:
    """A short human-readable report of ``result``."""
    lines = [
        f"mode {result.mode}: {result.nodes} nodes ({result.failed} crashed), "
        f"image {result.image_bytes / MiB:.1f} MiB",
        " ".join(["pull time per node, s:", *(f"{label} {value:.3f}" for label, value in (
            ("p50", result.percentile(0.5)), ("p90", result.percentile(0.9)),
            ("p99", result.percentile(0.99)), ("slowest", result.completion[-1])))]),
        f"all done at {result.makespan:.3f} s",
        f"registry egress: {result.registry_bytes / MiB:.1f} MiB "
        f"({result.registry_bytes / result.image_bytes:.3f} x image)",
        "bytes by source: " + ", ".join(
            f"{tag} {n / MiB:.1f} MiB" for tag, n in result.bytes_by_source.items()),
        f"Kumar-Ross bound: {result.bound:.3f} s; all done / bound = {result.ratio:.3f}",
        f"events {result.events}, wall {result.wall:.2f} s",
    ]
    if result.scheduler:
        lines.append("scheduler: " + ", ".join(f"{k} {v}" for k, v in result.scheduler.items()))
    return "\n".join(lines)


def _modes(args: argparse.Namespace) -> list[str]:
    if getattr(args, "baseline", None):
        return [args.baseline]
    modes = (args.modes or ",".join(RUNNERS)).split(",")
    unknown = [m for m in modes if m not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]}: choose from {', '.join(RUNNERS)}")
    return modes


def _log(args: argparse.Namespace) -> object:
    return (lambda line: print(line, file=sys.stderr)) if args.json else print


def _progress(args: argparse.Namespace) -> Callable[[Progress], None] | None:
    if not args.progress:
        return None
    return lambda p: print(f"  p2p: {p}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    log = _log(args)
    if args.name is not None:
        study = STUDIES.get(args.name)
        if study is None:
            raise SystemExit(f"no study {args.name!r}; see `python -m simulations list`")
        if args.free_coordinators:
            study = free_coordinators(study)
        if args.case is not None:
            cases = tuple(case for case in study.cases if args.case in case.label)
            if not cases:
                raise SystemExit(f"no case of {study.name} has {args.case!r} in its label")
            study = replace(study, cases=cases)
        _hint(max(case.scenario.nodes for case in study.cases))
        rows = run_study(study, log,  # type: ignore[arg-type]
                         lambda rows: save_study(study, rows, args.results), _progress(args),
                         jobs=args.jobs)
        path = save_study(study, rows, args.results)
        if len({row["nodes"] for row in rows}) > 2:  # a sweep over N: plot it
            plot_sweep(study_sweeps(rows), path.with_suffix(".png"), study.title)
        if args.json:
            print(json.dumps(rows, sort_keys=True))
        else:
            print(study_table(study, rows))
            print(f"\nwritten: {path} and {path.with_suffix('.md')}")
        return 0
    scenario = scenario_from(args)
    _hint(scenario.nodes)
    results = run_modes(scenario, _modes(args), progress=_progress(args))
    if args.plots is not None:
        args.plots.mkdir(parents=True, exist_ok=True)
        title = f"{scenario.nodes} nodes, {scenario.image_bytes / MiB:.0f} MiB image"
        plot_cdf(results, args.plots / "cdf.png", title)
        plot_egress(results, args.plots / "egress.png", title)
    if args.json:
        summaries = {mode: r.summary() for mode, r in results.items()}
        print(json.dumps(next(iter(summaries.values())) if len(summaries) == 1 else summaries,
                         sort_keys=True))
    else:
        print("\n\n".join(format_result(r) for r in results.values()))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    log = _log(args)
    modes = _modes(args)
    series: dict[str, list[tuple[int, float]]] = {m: [] for m in modes}
    counts = [int(x) for x in args.nodes_list.split(",")]
    scenarios = [scenario_from(args, nodes=n) for n in counts]
    for n, summaries in zip(counts, run_many(scenarios, modes, args.jobs), strict=True):
        for mode, summary in summaries.items():
            series[mode].append((n, summary["max"]))
            log(f"N={n} {mode}: all done at {summary['max']:.2f} s "  # type: ignore[operator]
                f"(bound {summary['bound']:.2f} s, wall {summary['wall']:.1f} s)")
    if args.plot is not None:
        plot_sweep(series, args.plot, "time until every node is done")
    if args.json:
        print(json.dumps(series, sort_keys=True))
    return 0


def _build() -> int:
    try:
        compiled.build()
    except compiled.BuildError as exc:
        print(f"build: {exc}", file=sys.stderr)
        return 1
    if compiled.in_use() == "interpreted":
        print("later `python -m simulations` runs load it (P2PD_SIM_COMPILED=0: they do not)")
    return 0


def _hint(nodes: int) -> None:
    if nodes >= LARGE_RUN and compiled.in_use() == "interpreted":
        print("note: interpreted; `python -m simulations build` makes large runs about "
              "twice as fast", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run, print; the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        for study in STUDIES.values():
            print(f"{study.name:20s} {study.title} ({len(study.cases)} cases; "
                  f"modes {', '.join(study.modes)})")
        return 0
    if args.command == "run":
        return _run(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "build":
        return _build()
    handler = args.handler
    status: int = handler(args)
    return status

