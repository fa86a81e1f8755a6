"""``p2pd demo``: the whole path on one machine, with real components.

A local docker-registry gets a generated multi-layer image; a p2pd daemon mirrors it; a
standalone containerd pulls it through p2pd twice (cold, then from p2pd's cache after the
image and its content were removed from containerd) and once straight from the registry
for comparison. A byte-counting proxy in front of the registry measures what left it.
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
from p2pd.lab.daemon import P2pd
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
        return PullResult(label, seconds, None, None, proxy.downstream_bytes)
    after = daemon.metrics()

    def delta(name: str, source: str) -> float:
        key = (name, (("source", source),))
        return after.get(key, 0.0) - before.get(key, 0.0)

    return PullResult(
        label, seconds,
        delta("p2pd_blob_bytes_fetched_total", "upstream"),
        delta("p2pd_blob_bytes_served_total", "cache"),
        proxy.downstream_bytes,
    )


def run_demo(workdir: Path | None, layer_sizes: Sequence[int], keep: bool = False) -> int:
    """Run the demo and print its report; return the process exit status."""
    missing = missing_bins("docker-registry", "containerd", "ctr", "skopeo")
    if missing:
        print(f"p2pd demo needs {', '.join(missing)}: run scripts/setup.sh first")
        return 2
    root = workdir or Path(tempfile.mkdtemp(prefix="p2pd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"p2pd demo: working in {root}")
    try:
        return _run(root, layer_sizes)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, layer_sizes: Sequence[int]) -> int:
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
            P2pd.start(root / "p2pd", registries={registry.host: proxy.url},
                       default_registry=registry.host,
                       extra=["--log-level", "info"]) as daemon,
            Containerd.start(root / "containerd") as containerd,
        ):
            print(f"- p2pd mirror on {daemon.url}, containerd on {containerd.sock}")
            hosts = root / "hosts"
            path = write_hosts_toml(hosts, registry.host, daemon.url, server=proxy.url)
            print(f"- wrote {path} (mirror first, the registry as fallback)")
            results = [_pull("1. cold, through p2pd", containerd, ref, hosts, proxy, daemon)]
            containerd.remove_image(ref)
            results.append(_pull("2. again, through p2pd", containerd, ref, hosts, proxy,
                                 daemon))
            containerd.remove_image(ref)
            direct = root / "hosts-direct"
            (direct / registry.host).mkdir(parents=True)
            (direct / registry.host / "hosts.toml").write_text(
                render_hosts_toml(registry.host, proxy.url, server=proxy.url))
            results.append(_pull("3. direct from the registry", containerd, ref, direct,
                                 proxy, None))
            blob_lines = [line.split(": ", 1)[-1] for line in daemon.log_text().splitlines()
                          if "p2pd.io.mirror: blob " in line]
    print()
    print(f"image {ref}: {len(image.layers)} layers + config = {human(image.blob_bytes)}")
    header = f"{'pull':30} {'time':>8} {'from upstream':>14} {'from p2pd cache':>16} " \
             f"{'left registry':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.label:30} {r.seconds:7.2f}s {human(r.upstream):>14} {human(r.cache):>16} "
              f"{human(r.registry_egress):>14}")
    print()
    print("p2pd's log, one line per blob served:")
    for line in blob_lines:
        print("  " + line)
    ok = results[1].upstream == 0 and results[1].cache == image.blob_bytes
    print()
    print("second pull came entirely from p2pd's cache" if ok else
          "UNEXPECTED: the second pull did not come from the cache")
    return 0 if ok else 1
