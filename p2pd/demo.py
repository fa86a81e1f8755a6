"""``p2pd demo``: the whole path on one machine, with real components.

A local docker-registry gets a generated multi-layer image; several p2pd daemons (each
with its own cache and ports, finding each other by a static peer list) mirror it; a
standalone containerd pulls it through the first daemon (cold: one copy from the
registry), then through each other daemon (their pieces come from peers), then through
the first again (its own cache), and once straight from the registry for comparison.
Between pulls the image and its content are removed from containerd. A byte-counting
proxy in front of the registry measures what left it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pd.hosts import render_hosts_toml, write_hosts_toml
from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd, start_swarm
from p2pd.lab.images import build_image, push_image
from p2pd.lab.procs import missing_bins
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry

REPO = "demo/app"


@dataclass(frozen=True)
class PullResult:
    """What one pull took, and where its bytes came from."""

    label: str
    seconds: float
    upstream: float | None
    peers: float | None
    cache: float | None
    registry_egress: int


def human(n: float | None) -> str:
    """Bytes in binary units."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _pull(
    label: str, containerd: Containerd, ref: str, hosts: Path, proxy: TcpProxy,
    daemon: P2pd | None,
) -> PullResult:
    before = daemon.metrics() if daemon else {}
    proxy.reset_counts()
    start = time.monotonic()
    containerd.pull(ref, hosts_dir=hosts)
    seconds = time.monotonic() - start
    if daemon is None:
        return PullResult(label, seconds, None, None, None, proxy.downstream_bytes)
    after = daemon.metrics()

    def delta(name: str, source: str) -> float:
        key = (name, (("source", source),))
        return after.get(key, 0.0) - before.get(key, 0.0)

    return PullResult(
        label, seconds,
        delta("p2pd_blob_bytes_fetched_total", "upstream"),
        delta("p2pd_blob_bytes_fetched_total", "peer"),
        delta("p2pd_blob_bytes_served_total", "cache"),
        proxy.downstream_bytes,
    )


def run_demo(
    workdir: Path | None, layer_sizes: Sequence[int], keep: bool = False, nodes: int = 3
) -> int:
    """Run the demo and print its report; return the process exit status."""
    missing = missing_bins("docker-registry", "containerd", "ctr", "skopeo")
    if missing:
        print(f"p2pd demo needs {', '.join(missing)}: run scripts/setup.sh first")
        return 2
    root = workdir or Path(tempfile.mkdtemp(prefix="p2pd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"p2pd demo: working in {root}")
    try:
        return _run(root, layer_sizes, max(1, nodes))
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, layer_sizes: Sequence[int], n: int) -> int:
    print(f"- generating an image with {len(layer_sizes)} layers "
          f"({', '.join(human(s) for s in layer_sizes)})")
    image = build_image(root / "layout", layer_sizes, seed=2024)
    with (
        Registry.start(root / "registry") as registry,
        TcpProxy.to(registry.host) as proxy,
    ):
        ref = push_image(image, registry.host, REPO)
        print(f"- pushed {ref} to docker-registry at {registry.url}")
        with (
            start_swarm(root, proxy.url, registry.host, n, "--log-level", "info") as daemons,
            Containerd.start(root / "containerd") as containerd,
        ):
            for i, daemon in enumerate(daemons):
                print(f"- node{i}: p2pd mirror {daemon.url}, peer port {daemon.peer_addr}")
            print(f"- containerd on {containerd.sock}; hosts.toml per node written by "
                  "p2pd containerd-config (mirror first, the registry as fallback)")
            results = []
            order = [(i, f"node{i}" + (", cold" if i == 0 else ", from peers"))
                     for i in range(n)] + [(0, "node0 again, its cache")]
            for step, (i, label) in enumerate(order, start=1):
                hosts = root / f"hosts{step}"
                write_hosts_toml(hosts, registry.host, daemons[i].url, server=proxy.url)
                if step > 1:
                    containerd.remove_image(ref)
                results.append(_pull(f"{step}. {label}", containerd, ref, hosts, proxy,
                                     daemons[i]))
            containerd.remove_image(ref)
            direct = root / "hosts-direct"
            (direct / registry.host).mkdir(parents=True)
            (direct / registry.host / "hosts.toml").write_text(
                render_hosts_toml(registry.host, proxy.url, server=proxy.url))
            results.append(_pull(f"{len(order) + 1}. direct from the registry", containerd,
                                 ref, direct, proxy, None))
            blob_lines = [(f"node{i}", line.split(": ", 1)[-1])
                          for i, daemon in enumerate(daemons)
                          for line in daemon.log_text().splitlines()
                          if "p2pd.io.mirror: blob " in line]
    print()
    print(f"image {ref}: {len(image.layers)} layers + config = {human(image.blob_bytes)}")
    header = (f"{'pull':30} {'time':>8} {'from registry':>14} {'from peers':>11} "
              f"{'from cache':>11} {'left registry':>14}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.label:30} {r.seconds:7.2f}s {human(r.upstream):>14} {human(r.peers):>11} "
              f"{human(r.cache):>11} {human(r.registry_egress):>14}")
    print()
    print("one log line per blob served (node: line):")
    for node, line in blob_lines:
        print(f"  {node}: {line}")
    peer_pulls = results[1:n]
    ok = all(r.peers is not None and r.peers >= 0.95 * image.layer_bytes for r in peer_pulls)
    ok = ok and results[n].upstream == 0 and results[n].cache == image.blob_bytes
    print()
    print(f"the pulls through node1..node{n - 1} came from peers and node0's second pull "
          "from its cache" if ok else "UNEXPECTED: some pull did not come from where it should")
    return 0 if ok else 1
