"""The real pieces of an emulation: a namespace lan, a registry, containerd and p2pd.

How it works. :class:`EmuLab` (a context manager) builds, for one
:class:`~simulations.cluster.Scenario`, a :class:`~p2pd.lab.netns.Lan` with a
``registry`` node running ``docker-registry`` and ``scenario.nodes`` nodes. The image
(one layer per ``Scenario.blobs()`` size, random bytes, see
:func:`~p2pd.lab.images.build_image`) is pushed with skopeo from inside the registry
node before any cap is set. Then the caps go on: ``tbf`` on every node's ``eth0``
(``node_up``) and on the registry's (``registry_up``); each node's ingress
(``node_down``) through an ``ifb`` device in the node, or, where the kernel has no
ifb/u32/mirred, with ``tbf`` on the node's bridge port (:attr:`EmuLab.ingress` says
which). Every node gets its own containerd (run in the root namespace: ``ctr`` does the
fetching, and ``ip netns exec`` puts ``ctr`` in the node). In p2p mode every node also
runs ``p2pd run`` with its mirror on the node's ``127.0.0.1:5001`` and its peer port on
the node's address, told about every other node by ``--peers static:...`` (and
``--max-uploads``, ``--upload-limit`` and ``--download-limit`` from ``Scenario.limits``);
one ``hosts.toml`` then serves all nodes (mirror ``http://127.0.0.1:5001``, fallback the
registry). In direct mode ``hosts.toml`` names the registry only.

:meth:`EmuLab.pull_all` starts one ``ctr images pull`` (at most
``limits.layer_concurrency`` layers at a time, like containerd's
``max_concurrent_downloads``) or ``ctr content fetch`` per node at once and returns each
one's start and end on the monotonic clock. Counters:
:meth:`EmuLab.registry_tx` (the registry's ``eth0``), :meth:`EmuLab.daemon_bytes` (the
daemons' ``p2pd_blob_bytes_fetched_total``), :func:`cpu_seconds` and
:func:`machine_busy` (``/proc``). Leaving the block stops every process (the lan kills
whatever is left in its namespaces) and deletes the namespaces.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pd.hosts import render_hosts_toml, write_hosts_toml
from p2pd.lab.containerd import Containerd
from p2pd.lab.images import Image, build_image, push_image
from p2pd.lab.netns import Lan, NetnsError, Node, NsP2pd, NsRegistry, start_registry
from p2pd.lab.procs import Proc, StopOnExit
from simulations.cluster import Scenario

REPO = "emulate/app"
PEER_PORT = 7000
MIRROR = "http://127.0.0.1:5001"
MODES = ("p2p", "direct")
Log = Callable[[str], object]


class EmulationError(RuntimeError):
    """A pull failed or did not finish in time, or the lab could not be set up."""


@dataclass(frozen=True, slots=True)
class Pull:
    """One node's pull: when it started and ended (``time.monotonic``), its exit status."""

    node: str
    started: float
    ended: float
    returncode: int
    unpack: float | None = None  # seconds ctr reported for unpacking (None: no unpack)


_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6,
             "ns": 1e-9}
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")


def go_duration(text: str) -> float:
    """Seconds in a Go ``time.Duration`` string such as ``1m2.5s`` or ``284.48ms``."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def unpack_seconds(log: str) -> float | None:
    """How long ``ctr images pull`` said it spent unpacking (the ``done:`` after its
    ``unpacking`` line), or ``None`` if it did not unpack."""
    _, found, after = log.rpartition("\nunpacking ")
    if not found:
        return None
    match = re.search(r"^done: (\S+)", after, re.MULTILINE)
    return go_duration(match.group(1)) if match else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of every child process this process has reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> tuple[int, int]:
    """``(busy, total)`` jiffies over all CPUs since boot (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


class EmuLab(StopOnExit):
    """Lan, registry with the image, containerds and (p2p mode) daemons; see the module."""

    def __init__(self, scenario: Scenario, workdir: Path | None = None, *,
                 mode: str = "p2p", log: Log = print, ingress: str = "ifb",
                 daemon_log_level: str = "info") -> None:
        """Build everything and apply the caps; on failure tear down what was built."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.scenario = scenario
        self.mode = mode
        self.log = log
        self.daemon_log_level = daemon_log_level
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="p2pd-emulate-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self.ingress = ingress
        self.daemons: list[NsP2pd] = []
        self.ctds: list[Containerd] = []
        try:
            self._build()
        except BaseException:
            self.stop()
            raise

    def _build(self) -> None:
        sc, work, t0 = self.scenario, self.workdir, time.monotonic()
        self.lan = self._stack.enter_context(Lan(work / "lan"))
        reg_node = self.lan.add_node("registry")
        self.nodes: list[Node] = [self.lan.add_node(f"node{i}") for i in range(sc.nodes)]
        self.registry: NsRegistry = start_registry(reg_node, work / "registry")
        self.image: Image = build_image(work / "image", [b.size for b in sc.blobs()],
                                        seed=sc.seed)
        self.ref: str = reg_node.call(push_image, self.image, self.registry.host, REPO)
        self.log(f"lan {self.lan.network}: registry {self.registry.host}, {sc.nodes} nodes; "
                 f"image {self.image.blob_bytes} bytes in {len(self.image.layers)} layers "
                 f"pushed ({time.monotonic() - t0:.1f} s)")
        self.hosts = work / "hosts"
        if self.mode == "p2p":
            write_hosts_toml(self.hosts, self.registry.host, MIRROR, server=self.registry.url)
        else:
            path = self.hosts / self.registry.host / "hosts.toml"
            path.parent.mkdir(parents=True)
            path.write_text(render_hosts_toml(self.registry.host, self.registry.url,
                                              server=self.registry.url))
        self._shape()
        self._start_containerds()
        if self.mode == "p2p":
            self._start_daemons()
        self.log(f"lab up in {time.monotonic() - t0:.1f} s (ingress caps via {self.ingress})")

    def _shape(self) -> None:
        sc = self.scenario
        self.registry.node.limit(round(sc.registry_up))
        for node in self.nodes:
            try:
                node.limit(round(sc.node_up), ingress=round(sc.node_down),
                           ingress_via=self.ingress)
            except NetnsError as exc:
                if self.ingress != "ifb" or node is not self.nodes[0]:
                    raise
                self.log(f"no ifb ingress shaping here ({exc}); tbf on the bridge ports")
                self.ingress = "bridge"
                node.limit(round(sc.node_up), ingress=round(sc.node_down),
                           ingress_via=self.ingress)

    def _start_containerds(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(Containerd.start, self.workdir / f"ctd-{node.name}",
                                   timeout=60.0) for node in self.nodes]
        failures: list[BaseException] = []
        for future in futures:
            try:
                self.ctds.append(self._stack.enter_context(future.result()))
            except Exception as exc:  # the others are stopped with the lab, then raised
                failures.append(exc)
        if failures:
            raise EmulationError(f"{len(failures)} containerds did not start") from failures[0]

    def _start_daemons(self) -> None:
        addrs = {node.name: f"{node.ip}:{PEER_PORT}" for node in self.nodes}
        reg = self.registry
        for node in self.nodes:
            others = ",".join(a for name, a in addrs.items() if name != node.name)
            daemon = NsP2pd.launch(node, self.workdir / f"p2pd-{node.name}",
                                   registries={reg.host: reg.url}, node_id=node.name,
                                   peers=f"static:{others}" if others else None,
                                   peer_port=PEER_PORT,
                                   extra=[*self._daemon_flags(),
                                          "--log-level", self.daemon_log_level])
            self.daemons.append(daemon)
            self._stack.callback(daemon.stop)
        for daemon in self.daemons:
            daemon.wait_ready(60.0)
        want, deadline = len(self.nodes) - 1, time.monotonic() + 30.0
        while not all(d.metric("p2pd_peers", state="alive") >= want for d in self.daemons):
            if time.monotonic() > deadline:
                self.log("warning: not every daemon saw every peer alive within 30 s")
                break
            time.sleep(0.25)

    def _daemon_flags(self) -> list[str]:
        """The scenario's daemon limits that ``p2pd run`` has flags for."""
        limits = self.scenario.limits
        flags = ["--max-uploads", str(limits.max_uploads)]
        if limits.upload_limit is not None:
            flags += ["--upload-limit", str(round(limits.upload_limit))]
        if limits.download_limit is not None:
            flags += ["--download-limit", str(round(limits.download_limit))]
        return flags

    def pull_args(self, ctd: Containerd, fetch_only: bool) -> list[str]:
        """The ``ctr`` command one node runs: ``images pull`` or ``content fetch``."""
        if fetch_only:
            return ctd.ctr_args("content", "fetch", "--plain-http", "--hosts-dir",
                                str(self.hosts), self.ref)
        # containerd's own max_concurrent_downloads, as the scenario has it (ctr's default
        # is every layer at once); ``content fetch`` has no such flag.
        layers = ("--max-concurrent-downloads", str(self.scenario.limits.layer_concurrency))
        return ctd.ctr_args(*ctd.pull_args(self.ref, hosts_dir=self.hosts, extra=layers))

    def pull_all(self, *, fetch_only: bool = False, timeout: float = 600.0) -> list[Pull]:
        """Every node pulls the image at once; one :class:`Pull` per node, in node order.

        Raises :class:`EmulationError` when a pull fails or ``timeout`` seconds pass.
        """
        argvs = [self.pull_args(ctd, fetch_only) for ctd in self.ctds]
        logs = [self.workdir / "pulls" / f"{node.name}.log" for node in self.nodes]
        pulls: list[Pull | None] = [None] * len(self.nodes)
        procs: list[Proc] = []

        def wait(i: int, proc: Proc, started: float) -> None:
            with contextlib.suppress(Exception):
                proc.wait(timeout)
            if proc.returncode is not None:
                ended = time.monotonic()
                log = logs[i].read_text(errors="replace") if logs[i].exists() else ""
                pulls[i] = Pull(self.nodes[i].name, started, ended, proc.returncode,
                                None if fetch_only else unpack_seconds(log))

        waiters: list[threading.Thread] = []
        for i, (node, argv) in enumerate(zip(self.nodes, argvs, strict=True)):
            started = time.monotonic()
            procs.append(node.popen(argv, logs[i]))
            waiters.append(threading.Thread(target=wait, args=(i, procs[-1], started),
                                            daemon=True))
            waiters[-1].start()
        for waiter in waiters:
            waiter.join()
        done = [p for p in pulls if p is not None]
        if len(done) < len(pulls):
            for proc in procs:
                proc.kill()
            raise EmulationError(f"{len(pulls) - len(done)} of {len(pulls)} pulls did not "
                                 f"finish within {timeout:.0f} s")
        failed = [(p, proc) for p, proc in zip(done, procs, strict=True) if p.returncode]
        if failed:
            pull, proc = failed[0]
            raise EmulationError(f"{len(failed)} pulls failed; {pull.node} exited "
                                 f"{pull.returncode}:\n{proc.log_tail(20)}")
        return done

    def registry_tx(self) -> int:
        """Bytes the registry node has sent on its ``eth0`` so far."""
        return self.registry.node.link_bytes()[1]

    def node_rx(self) -> list[int]:
        """Bytes each node has received on its ``eth0`` so far."""
        return [node.link_bytes()[0] for node in self.nodes]

    def daemon_bytes(self) -> dict[str, int]:
        """Blob bytes the daemons fetched, summed, as the simulation tags them."""
        out = {"registry": 0, "peer": 0}
        for daemon in self.daemons:
            out["registry"] += int(daemon.metric("p2pd_blob_bytes_fetched_total",
                                                 source="upstream"))
            out["peer"] += int(daemon.metric("p2pd_blob_bytes_fetched_total", source="peer"))
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the long-running processes, by role."""
        return {
            "p2pd": sum(cpu_seconds(d.proc.pid) for d in self.daemons),
            "containerd": sum(cpu_seconds(c.proc.pid) for c in self.ctds),
            "registry": cpu_seconds(self.registry.proc.pid),
        }

    def namespaces(self) -> list[str]:
        """The lan's namespace names (gone once the lab is stopped)."""
        return [self.lan.bridge_netns, self.registry.node.netns,
                *(node.netns for node in self.nodes)]

    def stop(self) -> None:
        """Stop every process, delete the namespaces (and a temporary workdir)."""
        try:
            self._stack.close()
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
