"""Several nodes on one machine: network namespaces on a private bridge.

A :class:`Lan` is a namespace holding a bridge (``p2pd-br-<suffix>``) and, for every
:meth:`Lan.add_node`, a namespace ``p2pd-n<i>-<suffix>`` whose ``eth0`` is one end of a
veth pair whose other end (``n<i>``) is a port of that bridge. Nodes get
``10.A.B.<i>/24`` from a /24 picked at random per lan, and ``lo`` up, so every node has
its own ``127.0.0.1`` too (a daemon's mirror port on ``127.0.0.1:5001`` in each node
does not clash). Nothing is created in, or routed through, the root namespace: the
veth pair is created from inside the node namespace with its peer end placed straight
into the bridge namespace, and no address is ever given to a root-namespace interface.
The root namespace has no route into a lan, on purpose.

Ways into a node:

- :meth:`Node.run` / :meth:`Node.popen`: ``ip netns exec NS ARGS...`` (a command and
  whatever it spawns live in the node's network namespace);
- :meth:`Node.call`: a Python callable run in a fresh thread that entered the node's
  network namespace with ``setns(2)`` (sockets it opens, and subprocesses it starts,
  belong to the node), e.g. ``node.call(push_image, image, host, repo)`` or
  ``node.get(url)``.

:meth:`Node.limit` caps a node's egress with ``tbf`` on its ``eth0`` and, optionally,
its ingress with ``tbf`` on its bridge port (the bridge sends to the node through it),
so no ifb device is needed; ``ingress_via="ifb"`` shapes ingress inside the node instead
(an ``ingress`` qdisc on ``eth0`` redirects every packet to an ``ifb0`` device whose
``tbf`` is the cap), where the kernel has ifb, u32 and mirred.

:meth:`Lan.close` stops every process started through the lan (and kills, by pid, any
process still inside one of its namespaces), then deletes the namespaces; the veth
pairs and the bridge go with them.

On top: :func:`start_registry` (a ``docker-registry`` serving on a node's address),
:meth:`NsP2pd.start` (a ``p2pd run`` inside a node, read through the node), and
:func:`netns_unavailable` (why namespaces cannot be used here, for a test skip).
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from p2pd.lab.daemon import P2pd
from p2pd.lab.procs import Proc, StopOnExit, wait_http
from p2pd.lab.registry import REGISTRY_BIN, Registry, registry_config

log = logging.getLogger(__name__)

IP_BIN = "ip"
TC_BIN = "tc"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NODE_IFACE = "eth0"
BRIDGE_IFACE = "br0"
IFB_IFACE = "ifb0"
INGRESS_VIA = ("bridge", "ifb")
MAX_NODES = 253

P = ParamSpec("P")
T = TypeVar("T")


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command setting up or driving a lan failed."""


def _ip(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return _run([IP_BIN, *args], check=check, timeout=timeout)


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {res.returncode}: "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (``None``: they can).

    Tries to create and delete a throwaway namespace; the reason names the failing step.
    """
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for binary in (IP_BIN, TC_BIN):
        if shutil.which(binary) is None:
            return f"{binary} (iproute2) is not installed"
    name = f"p2pd-probe-{secrets.token_hex(4)}"
    try:
        res = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {exc}"
    if res.returncode != 0:
        return f"ip netns add is not permitted here: {res.stderr.strip()}"
    try:
        probe = _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
                    check=False)
        if probe.returncode != 0:
            return f"cannot create veth pairs in a namespace: {probe.stderr.strip()}"
        probe = _ip("-n", name, "link", "add", "b0", "type", "bridge", check=False)
        if probe.returncode != 0:
            return f"cannot create a bridge in a namespace: {probe.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


_libc: ctypes.CDLL | None = None


def _setns(path: Path) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    global _libc
    setns = getattr(os, "setns", None)  # Python >= 3.12
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if setns is not None:
            setns(fd, CLONE_NEWNET)
            return
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Node:
    """One host of a :class:`Lan`: a network namespace with ``eth0`` on the bridge."""

    def __init__(self, lan: Lan, index: int, name: str, netns: str, ip: str) -> None:
        """Describe an already wired node; use :meth:`Lan.add_node`."""
        self.lan = lan
        self.index = index
        self.name = name
        self.netns = netns
        self.ip = ip
        self.bridge_port = f"n{index}"

    def exec_args(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``ip netns exec NS ARGS...``."""
        return [IP_BIN, "netns", "exec", self.netns, *(os.fspath(a) for a in args)]

    def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 60.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside the node and capture its output (text).

        ``check`` raises :class:`subprocess.CalledProcessError` (with the output) on a
        non-zero exit; ``timeout`` kills the command and raises
        :class:`subprocess.TimeoutExpired`.
        """
        argv = self.exec_args(args)
        log.debug("%s: running %s", self.name, " ".join(argv))
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             env=dict(env) if env is not None else None, input=input,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res

    def popen(
        self,
        args: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``args`` inside the node (output to ``log_path``); the lan stops it."""
        proc = Proc.start(self.exec_args(args), log_path, env=env, cwd=cwd)
        self.lan._procs.append(proc)
        return proc

    def call(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a new thread inside the node's network namespace.

        Sockets it opens and processes it starts belong to the node. Returns its result
        or re-raises its exception. ``fn`` must bound its own waits.
        """
        box: list[Any] = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                _setns(NETNS_DIR / self.netns)
                box.append(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller
                failure.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{self.netns}", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        result: T = box[0]
        return result

    def get(self, url: str, *, timeout: float = 10.0, **kwargs: Any) -> httpx.Response:
        """``GET url`` from inside the node (the whole body is read)."""
        def get() -> httpx.Response:
            with httpx.Client(timeout=timeout, trust_env=False) as client:
                return client.get(url, **kwargs)
        return self.call(get)

    def wait_http(
        self,
        url: str,
        *,
        timeout: float = 20.0,
        ok: Collection[int] = (200, 401),
        proc: Proc | None = None,
    ) -> None:
        """:func:`p2pd.lab.procs.wait_http` from inside the node."""
        self.call(wait_http, url, timeout=timeout, ok=ok, proc=proc)

    def link_bytes(self, iface: str = NODE_IFACE) -> tuple[int, int]:
        """``(rx, tx)`` byte counters of ``iface`` in the node (``ip -s -j link``)."""
        res = _ip("-n", self.netns, "-s", "-j", "link", "show", "dev", iface)
        stats = json.loads(res.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def limit(
        self,
        rate_bytes_per_s: int,
        *,
        ingress: int | None = None,
        burst: int | None = None,
        latency_ms: float = 50.0,
        ingress_via: str = "bridge",
    ) -> None:
        """Cap what the node sends to ``rate_bytes_per_s`` (``tbf`` on its ``eth0``).

        ``ingress`` caps what it receives the same way: on its bridge port
        (``ingress_via="bridge"``), or on an ``ifb0`` device in the node that its
        ``eth0`` ingress is redirected to (``"ifb"``; :class:`NetnsError` where the
        kernel lacks ifb, u32 or mirred). ``burst`` defaults to 1/20 s worth of bytes, at
        least 64 KiB (veth sends 64 KiB GSO packets). Calling again replaces the limits.
        """
        if ingress_via not in INGRESS_VIA:
            raise ValueError(f"ingress_via must be one of {INGRESS_VIA}, not {ingress_via!r}")
        self._tbf(["-n", self.netns], NODE_IFACE, rate_bytes_per_s, burst, latency_ms)
        if ingress is None:
            return
        if ingress_via == "ifb":
            self._unlimit_bridge_port()
            self._ifb_ingress(ingress, burst, latency_ms)
        else:
            self._unlimit_ifb()
            self._tbf(["-n", self.lan.bridge_netns], self.bridge_port, ingress, burst,
                      latency_ms)

    def _ifb_ingress(self, rate: int, burst: int | None, latency_ms: float) -> None:
        ns = ["-n", self.netns]
        if _ip(*ns, "link", "show", IFB_IFACE, check=False).returncode != 0:
            _ip(*ns, "link", "add", IFB_IFACE, "type", "ifb")
        _ip(*ns, "link", "set", IFB_IFACE, "up")
        # A fresh ingress qdisc drops any earlier filter, so a second call cannot stack.
        _run([TC_BIN, *ns, "qdisc", "del", "dev", NODE_IFACE, "ingress"], check=False)
        _run([TC_BIN, *ns, "qdisc", "add", "dev", NODE_IFACE, "handle", "ffff:", "ingress"])
        _run([TC_BIN, *ns, "filter", "add", "dev", NODE_IFACE, "parent", "ffff:",
              "protocol", "all", "u32", "match", "u32", "0", "0",
              "action", "mirred", "egress", "redirect", "dev", IFB_IFACE])
        self._tbf(ns, IFB_IFACE, rate, burst, latency_ms)

    def _unlimit_ifb(self) -> None:
        _run([TC_BIN, "-n", self.netns, "qdisc", "del", "dev", NODE_IFACE, "ingress"],
             check=False)
        _ip("-n", self.netns, "link", "del", IFB_IFACE, check=False)

    def _unlimit_bridge_port(self) -> None:
        _run([TC_BIN, "-n", self.lan.bridge_netns, "qdisc", "del", "dev", self.bridge_port,
              "root"], check=False)

    def unlimit(self) -> None:
        """Remove the caps set by :meth:`limit`."""
        _run([TC_BIN, "-n", self.netns, "qdisc", "del", "dev", NODE_IFACE, "root"],
             check=False)
        self._unlimit_bridge_port()
        self._unlimit_ifb()

    @staticmethod
    def _tbf(where: list[str], dev: str, rate: int, burst: int | None,
             latency_ms: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        burst = burst if burst is not None else max(64 * 1024, rate // 20)
        _run([TC_BIN, *where, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", f"{rate * 8}bit", "burst", str(burst), "latency", f"{latency_ms}ms"])

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.ip} netns={self.netns}>"


class Lan(StopOnExit):
    """A bridge in its own namespace and nodes in theirs; a context manager.

    ``workdir`` is where logs may go (a temporary directory by default, removed on
    close); ``subnet`` (``"10.A.B.0/24"``) overrides the random /24 in 10.0.0.0/8.
    """

    def __init__(self, workdir: Path | None = None, *, subnet: str | None = None) -> None:
        """Create the bridge namespace and its bridge; raise :class:`NetnsError` if not."""
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="p2pd-lan-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.suffix = secrets.token_hex(3)
        if subnet is None:
            rng = random.SystemRandom()
            subnet = f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
        self.network = ipaddress.IPv4Network(subnet)
        if not self.network.subnet_of(ipaddress.IPv4Network("10.0.0.0/8")) or \
                self.network.prefixlen != 24:
            raise ValueError(f"subnet {subnet!r} is not a /24 inside 10.0.0.0/8")
        self.bridge_netns = f"p2pd-br-{self.suffix}"
        self.nodes: list[Node] = []
        self._procs: list[Proc] = []
        self._namespaces: list[str] = []
        self._closed = False
        atexit.register(self.close)
        try:
            self._add_netns(self.bridge_netns)
            br = ["-n", self.bridge_netns]
            _ip(*br, "link", "set", "lo", "up")
            # No snooping: every multicast frame (mDNS included) is flooded to every port.
            _ip(*br, "link", "add", BRIDGE_IFACE, "type", "bridge", "mcast_snooping", "0")
            _ip(*br, "link", "set", BRIDGE_IFACE, "up")
        except BaseException:
            self.close()
            raise
        log.info("lan %s: bridge namespace %s, subnet %s", self.suffix, self.bridge_netns,
                 self.network)

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def add_node(self, name: str | None = None) -> Node:
        """A new namespace on the bridge with the next address; ``name`` is a label."""
        if self._closed:
            raise RuntimeError("the lan is closed")
        index = len(self.nodes) + 1
        if index > MAX_NODES:
            raise RuntimeError(f"a lan holds at most {MAX_NODES} nodes")
        netns = f"p2pd-n{index}-{self.suffix}"
        ip = str(self.network.network_address + index)
        self._add_netns(netns)
        node = Node(self, index, name or f"node{index}", netns, ip)
        ns = ["-n", netns]
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "link", "add", NODE_IFACE, "type", "veth", "peer", "name", node.bridge_port,
            "netns", self.bridge_netns)
        _ip("-n", self.bridge_netns, "link", "set", node.bridge_port, "master", BRIDGE_IFACE)
        _ip("-n", self.bridge_netns, "link", "set", node.bridge_port, "up")
        _ip(*ns, "addr", "add", f"{ip}/{self.network.prefixlen}", "dev", NODE_IFACE)
        _ip(*ns, "link", "set", NODE_IFACE, "up")
        # Multicast (mDNS) leaves through eth0 even for sockets that do not pick it.
        _ip(*ns, "route", "add", "224.0.0.0/4", "dev", NODE_IFACE)
        self.nodes.append(node)
        log.info("lan %s: node %s at %s (netns %s)", self.suffix, node.name, ip, netns)
        return node

    def pids(self) -> dict[str, list[int]]:
        """Processes inside each of the lan's namespaces (``ip netns pids``)."""
        out: dict[str, list[int]] = {}
        for name in self._namespaces:
            res = _ip("netns", "pids", name, check=False)
            out[name] = [int(p) for p in res.stdout.split() if p.isdigit()]
        return out

    def close(self) -> None:
        """Stop every process of the lan and delete its namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proc in reversed(self._procs):
            try:
                proc.stop(timeout=5.0)
            except Exception:  # pragma: no cover - keep cleaning up
                log.exception("lan %s: stopping %r failed", self.suffix, proc)
        me = os.getpid()
        for _ in range(3):
            stray = [pid for pids in self.pids().values() for pid in pids if pid != me]
            if not stray:
                break
            for pid in stray:  # only processes inside namespaces this lan created
                log.warning("lan %s: killing pid %d left in a namespace", self.suffix, pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for name in reversed(self._namespaces):
            res = _ip("netns", "del", name, check=False)
            if res.returncode != 0 and (NETNS_DIR / name).exists():
                log.error("lan %s: ip netns del %s failed: %s", self.suffix, name,
                          res.stderr.strip())
        self._namespaces.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop(self) -> None:
        """Same as :meth:`close` (leaving a ``with`` block calls it)."""
        self.close()

    def __repr__(self) -> str:
        return f"<Lan {self.network} bridge={self.bridge_netns} nodes={len(self.nodes)}>"


class NsRegistry(Registry):
    """A ``docker-registry`` serving plain HTTP on a node's lan address."""

    def __init__(self, node: Node, workdir: Path, root: Path, port: int, proc: Proc) -> None:
        """Wrap a started registry; use :func:`start_registry`."""
        super().__init__(workdir, root, port, proc, None)
        self.node = node

    @property
    def host(self) -> str:
        """``IP:PORT`` on the lan, the registry host as used in image references."""
        return f"{self.node.ip}:{self.port}"


def start_registry(
    node: Node, workdir: Path, *, port: int = 5000, timeout: float = 20.0
) -> NsRegistry:
    """Start ``docker-registry serve`` in ``node`` on ``node.ip:port``; wait for ``/v2/``."""
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(registry_config(root, f"{node.ip}:{port}"))
    proc = node.popen([REGISTRY_BIN, "serve", str(config)], workdir / "registry.log")
    registry = NsRegistry(node, workdir, root, port, proc)
    try:
        node.wait_http(f"{registry.url}/v2/", timeout=timeout, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return registry


def _metrics_text(url: str) -> str:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        resp = client.get(url)
        resp.raise_for_status()
        return resp.text


class NsP2pd(P2pd):
    """A ``p2pd run`` inside a node: mirror on the node's ``127.0.0.1``, peers on its IP.

    :attr:`url` (``http://127.0.0.1:PORT``) is only reachable from inside the node; the
    metrics are read through it (:meth:`Node.call`).
    """

    def __init__(self, node: Node, workdir: Path, port: int, proc: Proc,
                 args: list[str]) -> None:
        """Wrap a started daemon; use :meth:`NsP2pd.start` (or :meth:`launch`)."""
        super().__init__(workdir, port, proc, args)
        self.node = node

    @classmethod
    def launch(
        cls,
        node: Node,
        workdir: Path,
        *,
        registries: Mapping[str, str],
        default_registry: str | None = None,
        peers: str | None = None,
        node_id: str | None = None,
        mirror_port: int = 5001,
        peer_port: int | None = 7000,
        extra: Sequence[str] = (),
    ) -> NsP2pd:
        """Start the daemon without waiting for it (see :meth:`wait_ready`).

        ``peer_port`` opens the peer port on ``node.ip`` (None: no peer port);
        ``peers`` is the ``--peers`` spec.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "p2pd", "run",
                "--mirror-listen", f"127.0.0.1:{mirror_port}",
                "--cache-dir", str(workdir / "cache"), "--log-level", "debug"]
        for host, url in registries.items():
            args += ["--registry", f"{host}={url}"]
        if default_registry is None and registries:
            default_registry = next(iter(registries))
        if default_registry is not None:
            args += ["--default-registry", default_registry]
        if peer_port is not None:
            args += ["--peer-listen", f"{node.ip}:{peer_port}"]
        if peers is not None:
            args += ["--peers", peers]
        args += ["--node-id", node_id or node.name, *extra]
        proc = node.popen(args, workdir / "p2pd.log")
        return cls(node, workdir, mirror_port, proc, args)

    @classmethod
    def start_in(
        cls, node: Node, workdir: Path, *, timeout: float = 20.0, **kwargs: Any
    ) -> NsP2pd:
        """:meth:`launch`, then :meth:`wait_ready`."""
        daemon = cls.launch(node, workdir, **kwargs)
        try:
            daemon.wait_ready(timeout)
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until ``/healthz`` answers 200 inside the node (fail early if it exits)."""
        self.node.wait_http(f"{self.url}/healthz", timeout=timeout, ok=(200,), proc=self.proc)

    def restart(self, timeout: float = 20.0) -> None:
        """Start the same command again in the same node."""
        self.proc = self.node.popen(self.args, self.workdir / f"p2pd.log.{time.time_ns()}")
        self.wait_ready(timeout)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics`` (read inside the node)."""
        text = self.node.call(_metrics_text, f"{self.url}/metrics")
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def __repr__(self) -> str:
        return f"<NsP2pd {self.node.name} {self.node.ip} alive={self.proc.alive}>"


__all__ = [
    "Lan",
    "NetnsError",
    "Node",
    "NsP2pd",
    "NsRegistry",
    "netns_unavailable",
    "start_registry",
]
