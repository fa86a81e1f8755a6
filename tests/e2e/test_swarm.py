"""Several daemons on this machine share pieces: real docker-registry, real ctr pulls."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd, start_swarm
from p2pd.lab.images import build_image, push_image
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
MiB = 1 << 20


swarm = start_swarm


def wire(hosts: Path, registry: Registry, daemon: P2pd) -> Path:
    subprocess.run(
        [sys.executable, "-m", "p2pd", "containerd-config", "--registry", registry.host,
         "--mirror", daemon.url, "--server", registry.url, "--hosts-dir", str(hosts)],
        check=True, capture_output=True,
    )
    return hosts


def test_later_nodes_take_their_layers_from_peers(
    tmp_path: Path, registry: Registry, containerd: Containerd,
) -> None:
    image = build_image(tmp_path / "image", [2 * MiB, 6 * MiB, 12 * MiB], seed=5)
    ref = push_image(image, registry.host, "swarm/app")
    with TcpProxy.to(registry.host) as proxy, \
            swarm(tmp_path, proxy.url, registry.host, 3) as nodes:
        first = nodes[0]
        containerd.pull(ref, hosts_dir=wire(tmp_path / "hosts0", registry, first))
        assert first.metric("p2pd_blob_bytes_fetched_total", source="upstream") == \
            image.blob_bytes
        for i, node in enumerate(nodes[1:], start=1):
            containerd.remove_image(ref)
            proxy.reset_counts()
            containerd.pull(ref, hosts_dir=wire(tmp_path / f"hosts{i}", registry, node))
            assert ref in containerd.image_refs()
            from_peers = node.metric("p2pd_blob_bytes_fetched_total", source="peer")
            from_upstream = node.metric("p2pd_blob_bytes_fetched_total", source="upstream")
            assert from_peers >= 0.95 * image.layer_bytes, node.log_text()[-3000:]
            assert from_upstream <= 0.05 * image.layer_bytes
            # What left the registry for this pull: manifests and access checks only.
            assert proxy.downstream_bytes < 64 * 1024
        assert sum(n.metric("p2pd_peer_bytes_uploaded_total") for n in nodes) >= \
            2 * 0.95 * image.layer_bytes
        # The books every node keeps (refreshed every 2 s): its peers, and as coordinator
        # of some blobs, the leases it granted (one per blob: one copy from the registry).
        deadline = time.monotonic() + 10
        while sum(n.metric("p2pd_coordinated_blobs") for n in nodes) < len(image.blobs):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert all(n.metric("p2pd_peers", state="alive") == 2 for n in nodes)
        assert sum(n.metric("p2pd_leases_granted") for n in nodes) == len(image.blobs)
        assert sum(n.metric("p2pd_coordinator_requests_total", kind="lookup")
                   for n in nodes) >= 3 * len(image.blobs)


def test_five_nodes_starting_at_once_take_one_copy_from_the_registry(
    tmp_path: Path, registry: Registry,
) -> None:
    import concurrent.futures

    image = build_image(tmp_path / "image", [4 * MiB, 12 * MiB, 24 * MiB], seed=6)
    ref = push_image(image, registry.host, "swarm/rollout")
    n = 5
    with TcpProxy.to(registry.host, rate=40 * MiB) as proxy, \
            swarm(tmp_path, proxy.url, registry.host, n) as nodes, \
            contextlib.ExitStack() as stack:
        ctds = [stack.enter_context(Containerd.start(tmp_path / f"ctd{i}")) for i in range(n)]
        hosts = []
        for i, node in enumerate(nodes):
            # The fallback server goes through the proxy too: every byte is counted.
            hosts.append(tmp_path / f"hosts{i}")
            subprocess.run(
                [sys.executable, "-m", "p2pd", "containerd-config", "--registry",
                 registry.host, "--mirror", node.url, "--server", proxy.url,
                 "--hosts-dir", str(hosts[i])], check=True, capture_output=True)
        proxy.reset_counts()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            pulls = list(pool.map(lambda i: ctds[i].pull(ref, hosts_dir=hosts[i], timeout=120),
                                  range(n)))
        assert all(p.returncode == 0 for p in pulls)
        assert all(ref in c.image_refs() for c in ctds)
        egress = proxy.downstream_bytes
        assert egress <= 1.1 * image.blob_bytes, (egress, image.blob_bytes)
        upstream = sum(node.metric("p2pd_blob_bytes_fetched_total", source="upstream")
                       for node in nodes)
        from_peers = sum(node.metric("p2pd_blob_bytes_fetched_total", source="peer")
                         for node in nodes)
        assert upstream <= 1.1 * image.blob_bytes
        assert from_peers >= (n - 1) * 0.9 * image.layer_bytes


def test_daemons_find_each_other_with_mdns_on_loopback(
    tmp_path: Path, registry: Registry,
) -> None:
    import random as _random

    import httpx

    from p2pd.lab.procs import free_port

    image = build_image(tmp_path / "image", [3 * MiB], seed=8)
    push_image(image, registry.host, "swarm/mdns")
    layer = image.layers[0]
    service = f"p2pdt{_random.randrange(10**8):08d}"  # this test's own service name
    spec = f"mdns:{service}@127.0.0.1"
    common = {"registries": {registry.host: registry.url}, "default_registry": registry.host}
    with P2pd.start(tmp_path / "a", peer_port=free_port(), node_id="mdns-a",
                    extra=["--peers", spec], **common) as a, \
            P2pd.start(tmp_path / "b", peer_port=free_port(), node_id="mdns-b",
                       extra=["--peers", spec], **common) as b:
        deadline = time.monotonic() + 20
        while not (a.metric("p2pd_peers", state="alive") == 1 ==
                   b.metric("p2pd_peers", state="alive")):
            assert time.monotonic() < deadline, "the daemons never saw each other"
            time.sleep(0.2)
        url = f"/v2/swarm/mdns/blobs/{layer.digest}?ns={registry.host}"
        truth = image.blob_path(layer.digest).read_bytes()
        assert httpx.get(a.url + url, trust_env=False, timeout=30).content == truth
        assert httpx.get(b.url + url, trust_env=False, timeout=30).content == truth
        assert b.metric("p2pd_blob_bytes_fetched_total", source="peer") == layer.size


def test_a_node_fetching_one_layer_upstream_leaves_the_other_layers_to_its_peers(
    tmp_path: Path, registry: Registry,
) -> None:
    """node0 asks for three layers at once, its peers 50 ms later: node0 takes the first
    layer's lease and waits before asking for the others, which the peers take, so the
    first copies come through three nodes' links (each capped at 4 MiB/s from upstream)
    instead of all through node0's."""
    import concurrent.futures
    import hashlib

    import httpx

    image = build_image(tmp_path / "image", [3 * MiB, 3 * MiB, 3 * MiB], seed=8)
    assert len({layer.size for layer in image.layers}) == 1
    ref = push_image(image, registry.host, "swarm/spread")
    repo = ref.split("/", 1)[1].split(":")[0]
    with swarm(tmp_path, registry.url, registry.host, 3, "--upstream-limit", "4MiB") as nodes:

        def get(node: P2pd, digest: str) -> str:
            url = f"{node.url}/v2/{repo}/blobs/{digest}?ns={registry.host}"
            resp = httpx.get(url, timeout=60, trust_env=False)
            assert resp.status_code == 200, resp.text
            return "sha256:" + hashlib.sha256(resp.content).hexdigest()

        layers = [layer.digest for layer in image.layers]
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            first = [pool.submit(get, nodes[0], d) for d in layers]
            time.sleep(0.05)
            later = [pool.submit(get, node, d) for node in nodes[1:] for d in layers]
            assert [f.result() for f in first] == layers
            assert [f.result() for f in later] == layers * 2
        upstream = [n.metric("p2pd_blob_bytes_fetched_total", source="upstream")
                    for n in nodes]
        assert sum(upstream) == image.layer_bytes, upstream  # one copy from the registry
        assert upstream[0] == image.layers[0].size, (upstream, nodes[0].log_text()[-3000:])
