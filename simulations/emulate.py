"""``python -m simulations emulate ...``: the simulator's run, with real daemons.

How it works. :func:`emulate` builds an :class:`~simulations.emulab.EmuLab` for the
scenario (real ``docker-registry``, one network namespace per node on a bridge, a
containerd per node, a ``p2pd`` per node in p2p mode; caps with ``tbf`` on egress and an
``ifb`` device, or the bridge port, on ingress), reads the counters, starts every node's
``ctr images pull`` at once (``--fetch-only``: ``ctr content fetch``, which skips
unpacking), waits for all, reads the counters again and tears everything down, also on
Ctrl-C, SIGTERM or an error. It returns an :class:`Emulation`: a
:class:`~simulations.cluster.Result` with the same fields as the simulator's, and what
only an emulation knows (how ingress was shaped, CPU time by process, how busy the
machine was, each node's received bytes).

What is measured, and how:

- completion: each node's ``ctr`` exit, from the moment the first pull was started
  (``time.monotonic``); all pulls are started within a few milliseconds;
- registry egress: the registry node's ``eth0`` transmit counter over the pull phase, so
  it includes manifests, access checks, HTTP and TCP/IP headers and any fallback pull
  straight from the registry;
- bytes by source: the daemons' ``p2pd_blob_bytes_fetched_total`` (``upstream`` is
  reported as ``registry``, ``peer`` as ``peer``); in direct mode, the registry egress;
- wall: seconds from the first start to the last end.

Of a scenario's parameters the emulation takes the nodes, image (layers and their
sizes), caps, seed (the image's bytes), ``limits.max_uploads``, ``upload_limit`` and
``download_limit`` (the daemon's flags) and ``limits.layer_concurrency`` (``ctr
--max-concurrent-downloads``); it refuses other
arrivals than all at once, failures, disk caps and daemon limits that have no flag
(:func:`unsupported`).

Not emulated: link latency and the registry's answer time (``Scenario.latency``,
``registry_latency``) -- this kernel has no ``netem``; a veth round trip is ~0.05 ms and
the local registry answers in a few ms. The caps are exact up to the ``tbf`` burst
(1/20 s worth of bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from p2pd.lab.netns import netns_unavailable
from p2pd.lab.procs import missing_bins
from simulations.cluster import MiB, Result, Scenario, kumar_ross_bound
from simulations.emulab import EmuLab, EmulationError, Log, children_cpu_seconds, machine_busy
from simulations.node import Limits

__all__ = [
    "Emulation",
    "EmulationError",
    "add_emulate_parser",
    "emulate",
    "emulate_command",
    "main_emulate",
    "run_emulation",
]

BINARIES = ("docker-registry", "skopeo", "containerd", "ctr", "ip", "tc")
LATENCY_NOTE = "not emulated (no netem here); veth round trip ~0.05 ms"


@dataclass(frozen=True, slots=True)
class Emulation:
    """One emulated run: the simulator's figures (``result``) and the lab's own."""

    result: Result
    ingress: str  # "ifb" or "bridge": how node_down was enforced
    pull: str  # the ctr command every node ran
    setup: float  # seconds to build the lab
    teardown: float  # seconds to take it down
    starts: tuple[float, ...]  # each node's start after the first, in node order
    node_rx: tuple[int, ...]  # bytes each node received on eth0 during the pulls
    cpu: dict[str, float]  # CPU seconds during the pulls, by process kind
    load: float  # CPU seconds of the lab's processes over (pull seconds x CPUs)
    busy: float  # fraction of all CPUs busy during the pulls (other work included)
    namespaces: tuple[str, ...]  # the lan's network namespaces (all deleted by now)
    # seconds each node's ctr reported unpacking, in node order (empty: fetch only)
    unpack: tuple[float, ...] = ()
    latency: str = LATENCY_NOTE
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> dict[str, object]:
        """``result.summary()`` plus an ``emulation`` entry (JSON-ready)."""
        data = self.result.summary()
        extra = asdict(self)
        del extra["result"]
        data["emulation"] = extra
        return data


def unsupported(scenario: Scenario) -> list[str]:
    """What of ``scenario`` the emulation cannot do (empty: all of it)."""
    out = []
    if scenario.arrival != "all":
        out.append(f"arrival {scenario.arrival!r} (every node starts at once)")
    if scenario.failures:
        out.append("node failures")
    if scenario.disk is not None:
        out.append("disk caps")
    default = Limits()
    out += [f"limits.{name} (the daemon has no flag for it)"
            for name in ("max_waiting", "max_in_flight", "min_in_flight",
                         "max_in_flight_per_peer", "piece_size")
            if getattr(scenario.limits, name) != getattr(default, name)]
    return out


def default_timeout(scenario: Scenario) -> float:
    """Generous seconds for the pulls: three times a direct pull of every node, plus 60."""
    f = scenario.image_bytes
    direct = max(scenario.nodes * f / scenario.registry_up, f / scenario.node_down)
    return 60.0 + 3.0 * direct


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt (so the lab is torn down) meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def emulate(scenario: Scenario, *, workdir: Path | None = None, mode: str = "p2p",
            log: Log = print, fetch_only: bool = False,
            timeout: float | None = None) -> Emulation:
    """Run ``scenario`` with real daemons (``mode`` ``"p2p"`` or ``"direct"``).

    ``workdir`` keeps logs, caches and the image for a look afterwards (a temporary
    directory, removed at the end, by default). Raises :class:`EmulationError` if a pull
    fails or ``timeout`` (default :func:`default_timeout`) passes.
    """
    cannot = unsupported(scenario)
    if cannot:
        raise EmulationError(f"cannot emulate: {'; '.join(cannot)}")
    missing = missing_bins(*BINARIES)
    if missing:
        raise EmulationError(f"not installed: {', '.join(missing)}")
    reason = netns_unavailable()
    if reason is not None:
        raise EmulationError(f"network namespaces: {reason}")
    pull = "ctr content fetch" if fetch_only else \
        f"ctr images pull --max-concurrent-downloads {scenario.limits.layer_concurrency}"
    t0 = time.monotonic()
    with _interruptible():
        lab = EmuLab(scenario, workdir, mode=mode, log=log)
        try:
            setup = time.monotonic() - t0
            log(f"{mode}: {scenario.nodes} nodes start `{pull}` at once")
            tx0, rx0, cpu0 = lab.registry_tx(), lab.node_rx(), lab.cpu()
            ctr0, busy0 = children_cpu_seconds(), machine_busy()
            pulls = lab.pull_all(fetch_only=fetch_only,
                                 timeout=timeout or default_timeout(scenario))
            busy1, ctr1, cpu1 = machine_busy(), children_cpu_seconds(), lab.cpu()
            tx1, rx1 = lab.registry_tx(), lab.node_rx()
            sources = lab.daemon_bytes() if mode == "p2p" else {}
            netns = tuple(lab.namespaces())
        finally:
            t1 = time.monotonic()
            lab.stop()
            teardown = time.monotonic() - t1
    first = min(p.started for p in pulls)
    registry_bytes = tx1 - tx0
    if mode == "direct":
        sources = {"registry": registry_bytes}
    cpu = {kind: round(cpu1[kind] - cpu0[kind], 2) for kind in cpu1}
    cpu["ctr"] = round(ctr1 - ctr0, 2)
    wall = max(p.ended for p in pulls) - first
    result = Result(
        mode=f"emulation-{mode}", nodes=scenario.nodes, image_bytes=scenario.image_bytes,
        completion=tuple(sorted(p.ended - first for p in pulls)),
        registry_bytes=registry_bytes, bytes_by_source=sources,
        bytes_started=sum(sources.values()), bound=kumar_ross_bound(scenario), events=0,
        wall=wall,
    )
    notes: list[str] = []
    if mode == "p2p":
        fallback = registry_bytes - sources["registry"]
        notes.append(f"registry egress beyond the daemons' upstream fetches "
                     f"(manifests, checks, headers, fallback pulls): {fallback} bytes")
    return Emulation(
        result=result, ingress=lab.ingress, pull=pull, setup=round(setup, 2),
        teardown=round(teardown, 2), starts=tuple(round(p.started - first, 4) for p in pulls),
        node_rx=tuple(b - a for a, b in zip(rx0, rx1, strict=True)), cpu=cpu,
        load=round(sum(cpu.values()) / (wall * (os.cpu_count() or 1)), 3),
        busy=round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3), namespaces=netns,
        notes=tuple(notes),
        unpack=tuple(round(p.unpack, 3) for p in pulls if p.unpack is not None),
    )


def run_emulation(scenario: Scenario, *, workdir: Path | None = None, mode: str = "p2p",
                  log: Log = print, fetch_only: bool = False) -> Result:
    """:func:`emulate`, the simulator's figures only."""
    return emulate(scenario, workdir=workdir, mode=mode, log=log, fetch_only=fetch_only).result


def format_emulation(emulation: Emulation) -> str:
    """What only the emulation knows, in a few lines (after ``format_result``)."""
    cpu = ", ".join(f"{kind} {s:.1f}" for kind, s in emulation.cpu.items())
    rx = emulation.node_rx
    return "\n".join([
        f"pulls: `{emulation.pull}`; ingress caps via {emulation.ingress}; latency "
        f"{emulation.latency}",
        f"CPU s during pulls: {cpu} ({emulation.load:.0%} of the machine); all CPUs "
        f"busy {emulation.busy:.0%}",
        f"received per node: {min(rx) / MiB:.1f}..{max(rx) / MiB:.1f} MiB; pulls started "
        f"within {max(emulation.starts) * 1000:.0f} ms",
        f"lab setup {emulation.setup:.1f} s, teardown {emulation.teardown:.1f} s",
        *([f"unpacking per node (ctr): {min(emulation.unpack):.2f}..."
           f"{max(emulation.unpack):.2f} s"] if emulation.unpack else []),
        *emulation.notes,
    ])


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the parser has no subcommands")


def add_emulate_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``emulate`` to ``commands``: the ``run`` flags (add ``run`` first) and its own."""
    run = commands.choices.get("run")
    if run is None:
        raise RuntimeError("add the run subcommand before emulate (emulate takes its flags)")
    emulate_parser = commands.add_parser(
        "emulate", parents=[run], conflict_handler="resolve",
        help="the same run with real p2pd daemons in network namespaces (root)",
        description="Every node pulls the image at once with ctr through its own p2pd "
        "(--baseline direct: straight from the registry). --latency, --registry-latency "
        "and --exact are not emulated.")
    emulate_parser.add_argument("--fetch-only", action="store_true",
                                help="ctr content fetch (no unpacking) instead of ctr images "
                                "pull")
    emulate_parser.add_argument("--workdir", type=Path, default=None,
                                help="keep logs and caches here (default: a temporary dir)")
    emulate_parser.add_argument("--timeout", type=float, default=None,
                                help="seconds before the pulls are given up")
    emulate_parser.set_defaults(handler=emulate_command)
    return emulate_parser


def emulate_command(args: argparse.Namespace) -> int:
    """Run the parsed ``emulate`` command and print its report; the exit status."""
    from simulations.cli import format_result, scenario_from

    if getattr(args, "name", None) or getattr(args, "modes", None) or \
            args.baseline not in (None, "direct"):
        print("emulate: one scenario from flags, p2p or --baseline direct only",
              file=sys.stderr)
        return 2
    scenario = scenario_from(args)
    log: Log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        emulation = emulate(scenario, workdir=args.workdir, log=log,
                            mode="direct" if args.baseline == "direct" else "p2p",
                            fetch_only=args.fetch_only, timeout=args.timeout)
    except EmulationError as exc:
        print(f"emulate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(emulation.summary(), sort_keys=True))
    else:
        print(format_result(emulation.result))
        print(format_emulation(emulation))
    return 0


def main_emulate(argv: list[str] | None = None) -> int:
    """``python -m simulations emulate ARGV...`` whether or not ``__main__`` wires it."""
    from simulations import cli

    parser = cli._parser()
    commands = _subcommands(parser)
    if "emulate" not in commands.choices:
        add_emulate_parser(commands)
    args = parser.parse_args(["emulate", *(sys.argv[1:] if argv is None else argv)])
    return emulate_command(args)


if __name__ == "__main__":
    sys.exit(main_emulate())
