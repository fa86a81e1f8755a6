"""Benchmark of p2pd's swarm: piece throughput between daemons, and a cluster rollout.

Run with ``python -m benchmarks.bench_swarm [--nodes 5,10] [--size-mb 120] [--repeat 1]
[--json FILE] [--only pieces|rollout]``. Everything is started here, on 127.0.0.1 only,
and torn down at the end (every process and the temporary directory, in ``finally``):
a docker-registry with generated images pushed to it, p2pd daemons with static peers
(:class:`p2pd.lab.daemon.P2pd`, ``--log-level info``), private containerd instances and
a :class:`p2pd.lab.proxy.TcpProxy` in front of the registry.

(1) **pieces.** Daemons A and B know each other (static peers). A GET through A's mirror
    fills A's cache with one blob of ``--size-mb`` MiB (checked against its digest). Then,
    per round:

    * this process opens a peer link to A's peer port (:func:`p2pd.io.peer.open_peer_link`)
      and REQUESTs every piece, one at a time and with ``--inflight`` requests in flight
      (a trio nursery); the bytes are checked against the digest after the clock stops;
    * a raw TCP copy of the same number of bytes on loopback: a plain-socket server thread
      sends them from memory, a trio client in this process reads and discards them
      (the same client stack a peer link uses, minus the protocol);
    * daemon to daemon: a ``curl`` GET of the blob on B's mirror (B has an empty cache and
      takes every piece from A) next to a ``curl`` GET straight from the docker-registry.

    Reported: median MiB/s of each and the ratios (target >= 0.7 for the piece rows).

(2) **rollout**, for each N of ``--nodes``: N daemons that all know each other, N
    containerd instances, the registry behind a TcpProxy that counts bytes and caps the
    registry's egress at ``--registry-rate`` MiB/s (the registry is the bottleneck, as in
    a real cluster). An image of ``--size-mb`` MiB in 3 layers (10/30/60 %). All N
    ``ctr images pull`` start at once (threads). Measured: the bytes that left the registry
    (``proxy.downstream_bytes``; the hosts.toml ``server`` points at the proxy too, so
    fallback traffic is counted) and the time until every node is done. Then the same N
    nodes pulling straight from the registry (through the same proxy). Fresh daemons and
    caches for every p2pd run, and every image, content, snapshot and lease is removed from
    every containerd after every run.

    Reported per N: egress (also as a multiple of the image size F), time, and the
    Kumar-Ross lower bound of the distribution time,
    ``max(F/u_registry, F/d_node, N*F/(u_registry + sum(u_node)))``. On loopback the
    nodes' capacities are not known (in effect they are limited by the 2 CPUs, not by a
    link), so the bound used is the registry term alone: ``F/u_registry`` for p2pd and
    ``N*F/u_registry`` for the direct pulls (where nodes do not upload).

Also reported: the peak RSS (``VmHWM``) and CPU seconds of every daemon, of containerd,
ctr, the registry and this process (which runs the proxy), the "CPU floor" of each
rollout run (all those CPU seconds divided by the number of CPUs: no schedule can finish
sooner), what the upstream lease holders fetched and how fast (from the daemons' logs),
and the machine and code measured. ``os.sync()`` runs before each measured phase, so the
writeback of the previous one does not compete for the CPUs. The daemons run a copy of
``p2pd/`` taken at start (``--code``, as in ``bench_mirror``), so edits made to the
repository during a run cannot mix in.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from benchmarks.bench_mirror import (
    checked_get,
    cpu_seconds,
    describe_pid,
    kib,
    machine_info,
    prepare_code,
    say,
    sha256_file,
    write_direct_hosts,
)
from p2pd.core.pieces import PieceLayout
from p2pd.core.protocol import MAX_FEED
from p2pd.io.peer import PeerLink, open_peer_link
from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd
from p2pd.lab.images import Image, build_image, push_image
from p2pd.lab.procs import free_port, missing_bins
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry

MiB = 1 << 20
LOG_LEVEL = ["--log-level", "info"]
REPO_PIECES = "bench/swarm-blob"
REPO_ROLLOUT = "bench/swarm-rollout"
ROLLOUT_SPLIT = (0.10, 0.30, 0.60)
REQUIRED = ("docker-registry", "containerd", "ctr", "skopeo", "curl")
PIECE_TARGET = 0.7
CLIENT_ID = "bench-client"
WARNING_RE = re.compile(r" (WARNING|ERROR|CRITICAL) ")
# The mirror's access log line of a blob it served while fetching it from upstream.
UPSTREAM_SERVE_RE = re.compile(r"whole bytes=(\d+) from=upstream in ([\d.]+)s")
HEX_RE = re.compile(r"\b[0-9a-f]{12,64}\b")


# --------------------------------------------------------------------------- helpers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peer_arg(ports: list[int], me: int) -> list[str]:
    """``--peers static:...`` listing every port of ``ports`` except ``me``."""
    others = ",".join(f"127.0.0.1:{p}" for p in ports if p != me)
    return ["--peers", f"static:{others}"]


def start_node(workdir: Path, upstream: str, registry: Registry, port: int,
               ports: list[int], node_id: str) -> P2pd:
    """A p2pd with a peer port on ``port`` that knows every other port of ``ports``."""
    return P2pd.start(
        workdir, registries={registry.host: upstream}, default_registry=registry.host,
        peer_port=port, node_id=node_id, extra=[*peer_arg(ports, port), *LOG_LEVEL],
    )


def flat_metrics(daemon: P2pd) -> dict[str, float]:
    """The daemon's counters as ``name{label=value}`` -> value (one scrape)."""
    out: dict[str, float] = {}
    for (name, labels), value in daemon.metrics().items():
        key = name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")
        out[key] = value
    return out


def warnings_of(daemon: P2pd) -> list[str]:
    """Lines of the daemon's log at WARNING level or above."""
    return [line for line in daemon.log_text().splitlines() if WARNING_RE.search(line)]


def warning_kinds(lines: list[str]) -> list[tuple[str, int]]:
    """Distinct warning messages (timestamps, digests and numbers blanked) and counts."""
    kinds: Counter[str] = Counter()
    for line in lines:
        text = line.split(" ", 2)[-1]  # drop the date and time
        text = HEX_RE.sub("…", text)
        text = re.sub(r"\d+", "#", text)
        kinds[text[:200]] += 1
    return kinds.most_common()


def coordinated_by(digest: str, coordinator: int, others: list[int]) -> int:
    """A free port for another node such that ``coordinator`` coordinates ``digest``.

    The coordinator of a blob is the live member with the highest rendezvous hash of its
    id, which for static peers is the ``HOST:PORT`` address. Restarting a coordinator
    loses its soft state (who holds what) until the holders re-announce, up to 20 s
    later; (1) restarts B with an empty cache between rounds, so it lets A coordinate.
    """
    try:
        from p2pd.core.membership import Member, coordinator_for
    except ImportError:  # pragma: no cover - the module moved: take any port
        return free_port()
    want = f"127.0.0.1:{coordinator}"
    for _ in range(200):
        port = free_port()
        if port in others or port == coordinator:
            continue
        members = [Member(a, a) for a in
                   [want, f"127.0.0.1:{port}", *(f"127.0.0.1:{p}" for p in others)]]
        if coordinator_for(digest, members).addr == want:
            return port
    return free_port()


# --------------------------------------------------------------------------- (1) pieces


async def _request_pieces(
    addr: str, digest: str, size: int, inflight: int, keep: bool,
) -> tuple[float, int, list[bytes | None]]:
    """REQUEST every piece of ``digest`` from ``addr``: seconds from the first request to
    the last answer (the handshake is not timed), bytes received, and the pieces if
    ``keep`` (else they are dropped as they arrive, like the raw copy's reader does)."""
    count = PieceLayout.for_size(size).count
    got: list[bytes | None] = [None] * count
    received = 0
    refused: list[int] = []

    async def one(link: PeerLink, index: int) -> None:
        nonlocal received
        data = await link.request_piece(digest, size, index)
        if data is None:
            refused.append(index)
            return
        received += len(data)
        if keep:
            got[index] = data

    async with open_peer_link(addr, CLIENT_ID, None) as link:
        t0 = time.perf_counter()
        if inflight <= 1:
            for index in range(count):
                await one(link, index)
        else:
            todo = iter(range(count))

            async def worker() -> None:
                for index in todo:
                    await one(link, index)

            async with trio.open_nursery() as nursery:
                for _ in range(inflight):
                    nursery.start_soon(worker)
        elapsed = time.perf_counter() - t0
    if refused:
        raise RuntimeError(f"peer refused {len(refused)} pieces (first {sorted(refused)[:5]})")
    return elapsed, received, got


def request_pieces(addr: str, digest: str, size: int, inflight: int,
                   verify: bool = False) -> float:
    """MiB/s of fetching every piece over the peer protocol. With ``verify`` the pieces
    are kept and checked against the blob digest once the clock has stopped."""
    elapsed, received, got = trio.run(_request_pieces, addr, digest, size, inflight, verify)
    if received != size:
        raise RuntimeError(f"received {received} bytes of pieces, expected {size}")
    if verify:
        h = hashlib.sha256()
        for data in got:
            assert data is not None
            h.update(data)
        if "sha256:" + h.hexdigest() != digest:
            raise RuntimeError("pieces from the peer do not make up the blob")
    return size / MiB / elapsed


def raw_tcp_copy(total: int) -> float:
    """MiB/s of ``total`` bytes over loopback TCP: a plain-socket server thread sends them
    from memory once the client says go; a trio client reads and discards them."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1)  # "go": nothing sits in socket buffers before the clock starts
                chunk = memoryview(os.urandom(MiB))
                left = total
                while left:
                    n = min(left, len(chunk))
                    conn.sendall(chunk[:n])
                    left -= n
        except OSError as exc:
            errors.append(exc)

    async def client() -> tuple[float, int]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            t0 = time.perf_counter()
            await stream.send_all(b"g")
            got = 0
            while got < total:
                data = await stream.receive_some(MAX_FEED)
                if not data:
                    break
                got += len(data)
            return time.perf_counter() - t0, got

    thread = threading.Thread(target=serve, name="raw-tcp-server", daemon=True)
    thread.start()
    try:
        elapsed, got = trio.run(client)
    finally:
        listener.close()
        thread.join(timeout=30)
    if errors or got != total:
        raise RuntimeError(f"raw TCP copy: {got} of {total} bytes, {errors}")
    return total / MiB / elapsed


def bench_pieces(
    work: Path, registry: Registry, image: Image, repeat: int, inflight: int,
) -> dict[str, Any]:
    blob = image.layers[0]
    layout = PieceLayout.for_size(blob.size)
    port_a = free_port()
    port_b = coordinated_by(blob.digest, port_a, [])
    ports = [port_a, port_b]
    result: dict[str, Any] = {
        "blob_bytes": blob.size, "piece_bytes": layout.piece_size, "pieces": layout.count,
        "inflight": inflight,
    }
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(start_node(work / "A", registry.url, registry, port_a, ports, "A"))
        b = stack.enter_context(start_node(work / "B", registry.url, registry, port_b, ports, "B"))
        peer_a = f"127.0.0.1:{port_a}"
        via_a = f"{a.url}/v2/{REPO_PIECES}/blobs/{blob.digest}?ns={registry.host}"
        via_b = f"{b.url}/v2/{REPO_PIECES}/blobs/{blob.digest}?ns={registry.host}"
        direct = f"{registry.url}/v2/{REPO_PIECES}/blobs/{blob.digest}"

        say(f"(1) fill A: GET {blob.size / MiB:.1f} MiB through A's mirror")
        body = work / "fill.bin"
        fill = checked_get(via_a, blob.size, "fill GET on A", out=str(body))
        if sha256_file(body) != blob.digest:
            raise RuntimeError("A served bytes that do not match the blob digest")
        body.unlink()
        up = a.metric("p2pd_blob_bytes_fetched_total", source="upstream")
        if up != blob.size:
            raise RuntimeError(f"A fetched {up} bytes upstream, expected {blob.size}")
        result["fill_mib_s"] = fill.mib_s
        checked_get(direct, blob.size, "direct warm-up GET")  # registry page cache
        # Warm-ups, not timed; these check the pieces against the digest.
        request_pieces(peer_a, blob.digest, blob.size, 1, verify=True)
        request_pieces(peer_a, blob.digest, blob.size, inflight, verify=True)
        raw_tcp_copy(blob.size)
        os.sync()  # no writeback of the fill during the measurements

        speed: dict[str, list[float]] = {"seq": [], "par": [], "raw": [], "http": []}
        a_cpu: dict[str, list[float]] = {"seq": [], "par": []}
        runs = {
            "seq": lambda: request_pieces(peer_a, blob.digest, blob.size, 1),
            "par": lambda: request_pieces(peer_a, blob.digest, blob.size, inflight),
            "raw": lambda: raw_tcp_copy(blob.size),
            # The same cached bytes from A over HTTP (its mirror port, sendfile): the
            # alternative to msgpack frames for bulk piece bytes, measured in this run.
            "http": lambda: checked_get(via_a, blob.size, "HTTP GET on A").mib_s,
        }
        names = list(runs)
        for rnd in range(repeat):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for which in order:
                c0 = cpu_seconds(a.proc.pid)
                speed[which].append(runs[which]())
                if which in a_cpu:
                    a_cpu[which].append(cpu_seconds(a.proc.pid) - c0)
                say(f"(1) round {rnd + 1}/{repeat} {which}: {speed[which][-1]:8.1f} MiB/s")
        served = a.metric("p2pd_peer_bytes_uploaded_total")

        # Daemon to daemon: B (empty cache) GETs the blob through its mirror; every piece
        # comes from A. B restarts with an empty cache between rounds.
        d2d: dict[str, list[float]] = {"b": [], "direct": []}
        cpu_b: dict[str, list[float]] = {"a": [], "b": []}
        b_fetch: list[dict[str, float]] = []
        for rnd in range(repeat):
            if rnd:
                b.stop()
                shutil.rmtree(b.cache_dir, ignore_errors=True)
                b.restart()
                os.sync()
            order2 = ("b", "direct") if rnd % 2 == 0 else ("direct", "b")
            for which in order2:
                if which == "direct":
                    d2d["direct"].append(checked_get(direct, blob.size, "direct GET").mib_s)
                else:
                    ca, cb = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
                    d2d["b"].append(checked_get(via_b, blob.size, "GET on B").mib_s)
                    cpu_b["a"].append(cpu_seconds(a.proc.pid) - ca)
                    cpu_b["b"].append(cpu_seconds(b.proc.pid) - cb)
                    peer = b.metric("p2pd_blob_bytes_fetched_total", source="peer")
                    upstream = b.metric("p2pd_blob_bytes_fetched_total", source="upstream")
                    b_fetch.append({"peer": peer, "upstream": upstream})
                say(f"(1) round {rnd + 1}/{repeat} daemon-to-daemon {which}: "
                    f"{d2d[which][-1]:8.1f} MiB/s")
        result.update({
            "seq_mib_s": speed["seq"], "par_mib_s": speed["par"], "raw_mib_s": speed["raw"],
            "seq_median": median(speed["seq"]), "par_median": median(speed["par"]),
            "raw_median": median(speed["raw"]),
            "http_mib_s": speed["http"], "http_median": median(speed["http"]),
            "a_cpu_s_seq": a_cpu["seq"], "a_cpu_s_par": a_cpu["par"],
            "a_uploaded_bytes": served,
            "d2d_mib_s": d2d["b"], "registry_mib_s": d2d["direct"],
            "d2d_median": median(d2d["b"]), "registry_median": median(d2d["direct"]),
            "d2d_cpu_s": cpu_b, "d2d_b_fetched": b_fetch,
            "peak_rss_kib": {"A": kib(a.proc.pid, "VmHWM"), "B": kib(b.proc.pid, "VmHWM")},
            "cpu_s_total": {"A": cpu_seconds(a.proc.pid), "B": cpu_seconds(b.proc.pid)},
            "a_pid": describe_pid(a.proc.pid),
            "warnings": {"A": warnings_of(a)[:50], "B": warnings_of(b)[:50]},
        })
    return result


# --------------------------------------------------------------------------- (2) rollout


@dataclass
class PullRun:
    """One rollout run: N pulls started at once."""

    mode: str
    n: int
    seconds: float = 0.0
    per_node_s: list[float] = field(default_factory=list)
    egress_bytes: int = 0
    proxy_connections: int = 0
    failures: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    daemon_cpu_s: list[float] = field(default_factory=list)
    daemon_peak_rss_kib: list[int] = field(default_factory=list)
    daemon_fetched: list[dict[str, float]] = field(default_factory=list)
    warnings: list[tuple[str, int]] = field(default_factory=list)
    warning_lines: list[str] = field(default_factory=list)
    upstream_serves: list[tuple[str, int, float]] = field(default_factory=list)
    """``(node, bytes, seconds)`` of each blob a daemon served as it fetched it upstream."""


def concurrent_pulls(
    run: PullRun, ctds: list[Containerd], ref: str, hosts: list[Path], proxy: TcpProxy,
    registry: Registry,
) -> None:
    """Start ``len(ctds)`` pulls at once; fill in time, egress, failures and CPU."""
    n = len(ctds)
    os.sync()  # the previous run's writeback must not compete with this one for the CPUs
    pids = {"containerd": [c.proc.pid for c in ctds], "registry": [registry.proc.pid]}
    c0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0 = resource.getrusage(resource.RUSAGE_SELF)
    proxy.reset_counts()
    start = threading.Barrier(n + 1)
    t0 = 0.0

    def pull(i: int) -> tuple[float, str | None]:
        start.wait()
        res = ctds[i].pull(ref, hosts_dir=hosts[i], timeout=900, check=False)
        done = time.monotonic() - t0
        if res.returncode != 0:
            return done, f"node{i}: ctr exited {res.returncode}: {res.stderr.strip()[-500:]}"
        return done, None

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(pull, i) for i in range(n)]
        t0 = time.monotonic()
        start.wait()
        outcomes = [f.result() for f in futures]
    run.seconds = time.monotonic() - t0
    run.egress_bytes = proxy.downstream_bytes
    run.proxy_connections = proxy.connections
    run.per_node_s = [o[0] for o in outcomes]
    run.failures = [o[1] for o in outcomes if o[1]]
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s1 = resource.getrusage(resource.RUSAGE_SELF)
    run.cpu_s = {k: sum(cpu_seconds(p) for p in v) - c0[k] for k, v in pids.items()}
    run.cpu_s["ctr"] = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    run.cpu_s["bench+proxy"] = (s1.ru_utime + s1.ru_stime) - (s0.ru_utime + s0.ru_stime)
    for i, ctd in enumerate(ctds):
        if ref not in ctd.image_refs() or not ctd.snapshot_keys():
            run.failures.append(f"node{i}: no unpacked image after the pull")


def rollout_run(
    mode: str, work: Path, registry: Registry, proxy: TcpProxy, ctds: list[Containerd],
    ref: str, label: str,
) -> PullRun:
    """One p2pd or direct rollout over every containerd of ``ctds``."""
    n = len(ctds)
    run = PullRun(mode, n)
    try:
        if mode == "direct":
            hosts_dir = work / f"hosts-direct-{label}"
            # write_direct_hosts names the registry's own URL as server and host; here both
            # are the proxy, under the registry's host name (what the image ref names).
            path = write_direct_hosts(hosts_dir, registry) / registry.host / "hosts.toml"
            path.write_text(f'server = "{proxy.url}"\n\n'
                            f'[host."{proxy.url}"]\n  capabilities = ["pull", "resolve"]\n')
            concurrent_pulls(run, ctds, ref, [hosts_dir] * n, proxy, registry)
            return run
        ports = [free_port() for _ in range(n)]
        with contextlib.ExitStack() as stack:
            nodes = [stack.enter_context(start_node(
                work / f"{label}-node{i}", proxy.url, registry, port, ports, f"node{i}"))
                for i, port in enumerate(ports)]
            hosts = []
            for i, node in enumerate(nodes):
                hosts_dir = work / f"hosts-{label}-{i}"
                subprocess.run(
                    [sys.executable, "-m", "p2pd", "containerd-config", "--registry",
                     registry.host, "--mirror", node.url, "--server", proxy.url,
                     "--hosts-dir", str(hosts_dir)], check=True, capture_output=True)
                hosts.append(hosts_dir)
            cpu0 = [cpu_seconds(node.proc.pid) for node in nodes]
            concurrent_pulls(run, ctds, ref, hosts, proxy, registry)
            all_warnings: list[str] = []
            for i, node in enumerate(nodes):
                run.daemon_cpu_s.append(cpu_seconds(node.proc.pid) - cpu0[i])
                run.daemon_peak_rss_kib.append(kib(node.proc.pid, "VmHWM"))
                m = flat_metrics(node)
                run.daemon_fetched.append({
                    "upstream": m.get("p2pd_blob_bytes_fetched_total{source=upstream}", 0.0),
                    "peer": m.get("p2pd_blob_bytes_fetched_total{source=peer}", 0.0),
                    "uploaded": m.get("p2pd_peer_bytes_uploaded_total", 0.0),
                    "served_download": m.get(
                        "p2pd_blob_bytes_served_total{source=download}", 0.0),
                    "served_cache": m.get("p2pd_blob_bytes_served_total{source=cache}", 0.0),
                    "upstream_fetches": m.get("p2pd_upstream_blob_fetches_total", 0.0),
                    "blamed": m.get("p2pd_blamed_pieces_total", 0.0),
                })
                all_warnings += [f"node{i}: {line}" for line in warnings_of(node)]
                run.upstream_serves += [(f"node{i}", int(size), float(secs)) for size, secs
                                        in UPSTREAM_SERVE_RE.findall(node.log_text())]
            run.warnings = warning_kinds([w.split(": ", 1)[1] for w in all_warnings])
            run.warning_lines = all_warnings[:100]
        for i in range(n):
            shutil.rmtree(work / f"{label}-node{i}" / "cache", ignore_errors=True)
        return run
    finally:
        for ctd in ctds:
            ctd.remove_image(ref)


def bench_rollout(
    work: Path, registry: Registry, image: Image, nodes: list[int], repeat: int,
    rate_mib_s: float,
) -> dict[str, Any]:
    ref = f"{registry.host}/{REPO_ROLLOUT}:{image.tag}"
    image_bytes = image.blob_bytes
    rate = rate_mib_s * MiB
    result: dict[str, Any] = {
        "image_bytes": image_bytes, "layer_bytes": [x.size for x in image.layers],
        "registry_rate_bytes_s": rate, "per_n": {},
    }
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(TcpProxy.to(registry.host, rate=rate))
        ctds: list[Containerd] = []
        for i in range(max(nodes)):
            ctds.append(stack.enter_context(Containerd.start(work / f"ctd{i}")))
        say(f"(2) {len(ctds)} containerd instances up; warm-up: one untimed direct pull")
        rollout_run("direct", work, registry, proxy, ctds[:1], ref, "warmup")
        for n in nodes:
            runs: dict[str, list[PullRun]] = {"p2pd": [], "direct": []}
            for rnd in range(repeat):
                order = ("p2pd", "direct") if rnd % 2 == 0 else ("direct", "p2pd")
                for mode in order:
                    say(f"(2) N={n} round {rnd + 1}/{repeat}: {mode} rollout")
                    run = rollout_run(mode, work, registry, proxy, ctds[:n], ref,
                                      f"n{n}-r{rnd}-{mode}")
                    runs[mode].append(run)
                    up = sum(f["upstream"] for f in run.daemon_fetched)
                    say(f"(2) N={n} {mode}: {run.seconds:.2f} s, egress "
                        f"{run.egress_bytes / MiB:.1f} MiB "
                        f"({run.egress_bytes / image_bytes:.2f} x image)"
                        + (f", daemons fetched {up / MiB:.1f} MiB upstream" if up else "")
                        + (f", FAILURES: {run.failures}" if run.failures else ""))
            p, d = runs["p2pd"], runs["direct"]
            bound_p2p = image_bytes / rate
            bound_direct = n * image_bytes / rate
            tp = median([r.seconds for r in p])
            td = median([r.seconds for r in d])
            ep = median([float(r.egress_bytes) for r in p])
            ed = median([float(r.egress_bytes) for r in d])
            result["per_n"][str(n)] = {
                "n": n,
                "p2pd_s": tp, "direct_s": td,
                "p2pd_egress_bytes": ep, "direct_egress_bytes": ed,
                "bound_p2pd_s": bound_p2p, "bound_direct_s": bound_direct,
                "runs": {"p2pd": [asdict(r) for r in p], "direct": [asdict(r) for r in d]},
            }
    return result


# --------------------------------------------------------------------------- report


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    pieces: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)


def report(res: Results) -> str:
    m, c = res.machine, res.config
    fmt = ", ".join
    lines = [
        f"machine: nproc={m['nproc']}  {m['cpu']}  mem {m['mem_total_mib']} MiB",
        f"         {m['python']}  kernel {m['kernel']}  {m['ctr']}",
        f"config:  size {c['size_mb']} MiB, repeat {c['repeat']}, nodes {c['nodes']}, "
        f"registry cap {c['registry_rate_mib_s']:g} MiB/s, {c['inflight']} in flight, "
        f"p2pd log level info",
        f"code:    {c.get('code')} = {c.get('p2pd_path')} (tree sha256 "
        f"{c.get('p2pd_tree_sha256')}, git HEAD {c.get('git_head')}"
        + (f", ref {c['git_ref']}" if "git_ref" in c else "")
        + (", p2pd/ has uncommitted edits" if c.get("git_dirty_p2pd") else "") + ")",
        "",
    ]
    p = res.pieces
    if p:
        lines += [
            f"(1) pieces: blob {p['blob_bytes'] / MiB:.1f} MiB = {p['pieces']} pieces of "
            f"{p['piece_bytes'] / MiB:g} MiB; median of {len(p['seq_mib_s'])} round(s)",
            f"{'':52s} {'p2pd MiB/s':>11s} {'baseline':>11s} {'ratio':>7s} {'target':>7s}  ok",
        ]

        def row(label: str, got: float, base: float, target: float | None) -> str:
            ratio = got / base
            ok = "" if target is None else ("yes" if ratio >= target else "NO")
            tgt = "(info)" if target is None else f">={target:.2f}"
            return f"{label:52s} {got:11.1f} {base:11.1f} {ratio:7.3f} {tgt:>7s}  {ok}"

        lines += [
            row("peer REQUEST from A, 1 in flight  vs raw TCP", p["seq_median"],
                p["raw_median"], PIECE_TARGET),
            row(f"peer REQUEST from A, {p['inflight']} in flight  vs raw TCP",
                p["par_median"], p["raw_median"], PIECE_TARGET),
            row("same bytes from A over HTTP (sendfile)  vs raw TCP", p["http_median"],
                p["raw_median"], None),
            row("GET on B's mirror (B <- A)  vs GET on registry", p["d2d_median"],
                p["registry_median"], None),
            "",
            f"    samples MiB/s: 1 in flight [{fmt(f'{x:.1f}' for x in p['seq_mib_s'])}]  "
            f"{p['inflight']} in flight [{fmt(f'{x:.1f}' for x in p['par_mib_s'])}]  "
            f"raw TCP [{fmt(f'{x:.1f}' for x in p['raw_mib_s'])}]",
            f"    samples MiB/s: B mirror [{fmt(f'{x:.1f}' for x in p['d2d_mib_s'])}]  "
            f"registry [{fmt(f'{x:.1f}' for x in p['registry_mib_s'])}]",
            f"    A CPU s per blob served: 1 in flight "
            f"[{fmt(f'{x:.2f}' for x in p['a_cpu_s_seq'])}]  {p['inflight']} in flight "
            f"[{fmt(f'{x:.2f}' for x in p['a_cpu_s_par'])}]",
            f"    B mirror GET CPU s: A [{fmt(f'{x:.2f}' for x in p['d2d_cpu_s']['a'])}]  "
            f"B [{fmt(f'{x:.2f}' for x in p['d2d_cpu_s']['b'])}];  B fetched "
            + fmt(f"peer {f['peer'] / MiB:.1f} MiB / upstream {f['upstream'] / MiB:.1f} MiB"
                  for f in p["d2d_b_fetched"]),
            f"    fill GET through A (from the registry): {p['fill_mib_s']:.1f} MiB/s",
            f"    peak RSS (VmHWM) MiB: A {p['peak_rss_kib']['A'] / 1024:.1f}, "
            f"B {p['peak_rss_kib']['B'] / 1024:.1f};  CPU s over the whole phase: "
            f"A {p['cpu_s_total']['A']:.1f}, B {p['cpu_s_total']['B']:.1f}",
            f"    warnings logged: A {len(p['warnings']['A'])}, B {len(p['warnings']['B'])}",
            "",
        ]
    r = res.rollout
    if r:
        size = r["image_bytes"]
        rate = r["registry_rate_bytes_s"]
        lines += [
            f"(2) rollout: image F = {size / MiB:.1f} MiB (layers "
            f"{'/'.join(f'{x / MiB:.1f}' for x in r['layer_bytes'])} MiB + config), registry "
            f"capped at {rate / MiB:g} MiB/s; medians; bound = Kumar-Ross with only the "
            "registry term",
            "    Kumar-Ross: T >= max(F/u_registry, F/d_node, N*F/(u_registry + sum u_node)); "
            "node capacities are unknown on loopback, so only F/u_registry is used (p2pd);",
            "    for direct pulls nodes upload nothing, so the bound is N*F/u_registry.",
            f"{'':3s} {'egress MiB (x F)':^29s} {'time to all done, s':^29s} "
            f"{'bound p2pd':>10s} {'p2pd/':>6s} {'bound':>8s} {'direct/':>7s}",
            f"{'N':>3s} {'p2pd':>14s} {'direct':>14s} {'p2pd':>9s} {'direct':>9s} "
            f"{'p2pd/dir':>9s} {'F/u, s':>10s} {'bound':>6s} {'NF/u, s':>8s} {'bound':>7s}",
        ]
        for key, row_n in r["per_n"].items():
            ep, ed = row_n["p2pd_egress_bytes"], row_n["direct_egress_bytes"]
            tp, td = row_n["p2pd_s"], row_n["direct_s"]
            bp, bd = row_n["bound_p2pd_s"], row_n["bound_direct_s"]
            lines.append(
                f"{key:>3s} {ep / MiB:7.1f} ({ep / size:4.2f}) {ed / MiB:7.1f} ({ed / size:4.2f})"
                f" {tp:9.2f} {td:9.2f} {tp / td:9.3f} {bp:10.2f} {tp / bp:6.2f} {bd:8.2f}"
                f" {td / bd:7.2f}")
        for key, row_n in r["per_n"].items():
            for mode in ("p2pd", "direct"):
                for i, run in enumerate(row_n["runs"][mode]):
                    per = sorted(run["per_node_s"])
                    cpu = run["cpu_s"]
                    head = f"    N={key} {mode:6s} run {i + 1}:"
                    total_cpu = sum(cpu.values()) + sum(run["daemon_cpu_s"])
                    lines.append(
                        f"{head} nodes done after {fmt(f'{x:.1f}' for x in per)} s; "
                        f"{run['proxy_connections']} registry connections; CPU s: "
                        + fmt(f"{k} {v:.1f}" for k, v in cpu.items())
                        + (f", p2pd {sum(run['daemon_cpu_s']):.1f}"
                           if run["daemon_cpu_s"] else "")
                        + f" (total {total_cpu:.1f} over {run['seconds']:.1f} s on "
                        f"{m['nproc']} CPUs: CPU floor {total_cpu / m['nproc']:.1f} s)")
                    big = [u for u in run["upstream_serves"] if u[1] >= MiB]
                    if big:
                        lines.append(
                            f"{' ' * len(head)} fetched upstream while serving (lease "
                            "holders, from the logs): " + fmt(
                                f"{node} {size / MiB:.1f} MiB in {secs:.2f} s "
                                f"({size / MiB / secs:.1f} MiB/s)" for node, size, secs in big))
                    if run["daemon_fetched"]:
                        f = run["daemon_fetched"]
                        up = [x["upstream"] / MiB for x in f]
                        rss = [x / 1024 for x in run["daemon_peak_rss_kib"]]
                        lines.append(
                            f"{' ' * len(head)} daemons fetched upstream {sum(up):.1f} MiB "
                            f"(per node [{fmt(f'{x:.0f}' for x in up)}]), "
                            f"from peers {sum(x['peer'] for x in f) / MiB:.1f} MiB, "
                            f"blamed pieces {sum(x['blamed'] for x in f):.0f}; "
                            f"peak RSS MiB [{fmt(f'{x:.0f}' for x in rss)}]"
                            f"; CPU s [{fmt(f'{x:.1f}' for x in run['daemon_cpu_s'])}]")
                    for text, count in run["warnings"][:6]:
                        lines.append(f"{' ' * len(head)} warning x{count}: {text}")
                    for failure in run["failures"]:
                        lines.append(f"{' ' * len(head)} FAILED {failure}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def workspace(parent: Path | None, keep: bool) -> Iterator[Path]:
    """A temporary work dir, deleted afterwards unless ``keep``; the cwd is restored."""
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(prefix="p2pd-swarm-bench-", dir=parent)).resolve()
    say(f"work dir {work}")
    try:
        yield work
    finally:
        os.chdir(cwd)
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            if work.exists():
                say(f"could not remove all of {work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_swarm",
        description="p2pd swarm: piece throughput between daemons (1) and an N-node "
        "rollout against pulling straight from the registry (2), side by side.")
    parser.add_argument("--nodes", default="5,10", help="rollout sizes N (default 5,10)")
    parser.add_argument("--size-mb", type=float, default=120,
                        help="MiB: the blob of (1) and the image of (2) (default 120)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of everything")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--only", choices=("pieces", "rollout"), help="run one part only")
    parser.add_argument("--registry-rate", type=float, default=100, metavar="MIB_S",
                        help="cap on the registry's egress in (2), MiB/s (default 100)")
    parser.add_argument("--inflight", type=int, default=4,
                        help="requests in flight in the parallel piece run (default 4)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary work dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--code", default="worktree", metavar="WHICH",
                        help="p2pd code the daemons run: 'worktree' (a copy of p2pd/ taken "
                        "at start, default), 'live', a git revision, or a directory")
    args = parser.parse_args(argv)
    try:
        nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        parser.error("--nodes takes a comma-separated list of integers")
    if (args.repeat < 1 or args.size_mb <= 0 or not nodes or min(nodes) < 1
            or args.registry_rate <= 0 or args.inflight < 1):
        parser.error("--repeat, --size-mb, --nodes, --registry-rate, --inflight must be > 0")
    missing = missing_bins(*REQUIRED)
    if missing:
        print(f"missing executables: {', '.join(missing)}", file=sys.stderr)
        return 2

    size = int(args.size_mb * MiB)
    res = Results(machine=machine_info(), config={
        "size_mb": args.size_mb, "repeat": args.repeat, "nodes": nodes,
        "registry_rate_mib_s": args.registry_rate, "inflight": args.inflight})
    json_path = args.json.resolve() if args.json else None
    with workspace(args.workdir, args.keep) as work:
        res.config.update(prepare_code(args.code, work))
        say(f"p2pd code: {res.config['code']} {res.config['p2pd_path']} "
            f"(tree {res.config['p2pd_tree_sha256']})")
        with Registry.start(work / "registry") as registry:
            if args.only != "rollout":
                say(f"building + pushing a 1-layer image of {size / MiB:.0f} MiB")
                blob_image = build_image(work / "img-pieces", [size], seed=303)
                push_image(blob_image, registry.host, REPO_PIECES)
                shutil.rmtree(work / "img-pieces")
                res.pieces = bench_pieces(work, registry, blob_image, args.repeat,
                                          args.inflight)
            if args.only != "pieces":
                sizes = [int(size * f) for f in ROLLOUT_SPLIT]
                say(f"building + pushing a 3-layer image: "
                    f"{'/'.join(f'{s / MiB:.0f}' for s in sizes)} MiB")
                image = build_image(work / "img-rollout", sizes, seed=404)
                push_image(image, registry.host, REPO_ROLLOUT)
                shutil.rmtree(work / "img-rollout")
                res.rollout = bench_rollout(work, registry, image, nodes, args.repeat,
                                            args.registry_rate)
    text = report(res)
    print(text)
    if json_path:
        json_path.write_text(json.dumps(asdict(res), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
