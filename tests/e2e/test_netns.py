"""Nodes in network namespaces on a private bridge (p2pd.lab.netns), end to end.

Every node is its own network namespace with a 10.x address on a bridge that lives in a
namespace of its own; nothing is addressed or routed in the root namespace, so the root
namespace cannot reach any node (on purpose). The registry runs in a node and the image
is pushed from inside it; each daemon runs in a node with its mirror on the node's own
``127.0.0.1:5001`` and its peer port on the node's address; containerd runs in the root
namespace but ``ip netns exec NODE ctr images pull`` does the fetching in the node (ctr
streams what it fetched into containerd over the unix socket, and containerd unpacks it).
So one ``hosts.toml`` (mirror ``http://127.0.0.1:5001``) serves every node.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pd.lab.containerd import Containerd
from p2pd.lab.images import Image, build_image, push_image
from p2pd.lab.netns import Lan, Node, NsP2pd, NsRegistry, netns_unavailable, start_registry
from p2pd.lab.procs import missing_bins

pytestmark = pytest.mark.e2e
MiB = 1 << 20
REPO = "netns/app"
LAYERS = (2 * MiB, 6 * MiB, 12 * MiB)
PEER_PORT = 7000


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"netns lab: {reason}")


def require_bins(*names: str) -> None:
    missing = missing_bins(*names)
    if missing:
        pytest.skip(f"e2e: required executables not installed: {', '.join(missing)}")


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> float:
    """Poll ``cond`` until true; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start


# -- the lan itself -------------------------------------------------------------------


def _sink(listener: socket.socket, got: list[float], want: int) -> None:
    """Accept one connection and read ``want`` bytes; append the seconds it took."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(20)
        start, n = time.monotonic(), 0
        while n < want:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            n += len(chunk)
        got.append(time.monotonic() - start if n == want else -1.0)


def send_timed(src: Node, dst: Node, nbytes: int) -> float:
    """Seconds ``src`` needs to push ``nbytes`` over TCP to ``dst`` (receiver's clock)."""
    def listen() -> socket.socket:
        sock = socket.socket()
        sock.bind((dst.ip, 0))
        sock.listen(1)
        sock.settimeout(20)
        return sock

    listener = dst.call(listen)  # the socket stays in dst's namespace
    port = listener.getsockname()[1]
    took: list[float] = []
    reader = threading.Thread(target=_sink, args=(listener, took, nbytes), daemon=True)
    reader.start()
    conn = src.call(socket.create_connection, (dst.ip, port), 5)
    with conn, listener:
        conn.sendall(b"\0" * nbytes)
        reader.join(30)
    assert took and took[0] >= 0, "the transfer did not complete"
    return took[0]


def test_lan_isolates_nodes_caps_rates_and_cleans_up(tmp_path: Path) -> None:
    require_netns()
    with Lan(tmp_path / "lan") as lan:
        a, b = lan.add_node("a"), lan.add_node("b")
        assert a.ip != b.ip and a.ip.startswith("10.") and a.ip.rsplit(".", 1)[0] == \
            b.ip.rsplit(".", 1)[0]
        links = a.run(["ip", "-o", "addr", "show"]).stdout
        assert f"inet {a.ip}/24" in links and "127.0.0.1/8" in links
        assert "224.0.0.0/4 dev eth0" in a.run(["ip", "route"]).stdout
        # Each node has a loopback of its own: the same port is free in both.
        for node in (a, b):
            node.call(lambda: socket.create_server(("127.0.0.1", 5001)).close())
        free = send_timed(a, b, 4 * MiB)
        a.limit(4 * MiB)
        egress = send_timed(a, b, 4 * MiB)
        a.unlimit()
        b.limit(64 * MiB, ingress=4 * MiB)  # b's downlink, shaped on its bridge port
        ingress = send_timed(a, b, 4 * MiB)
        sleeper = a.popen(["sleep", "60"], tmp_path / "sleep.log")
        namespaces = [lan.bridge_netns, a.netns, b.netns]
        assert sleeper.pid in lan.pids()[a.netns]
    print(f"\n4 MiB a->b: unlimited {free:.3f} s, egress cap 4 MiB/s {egress:.3f} s, "
          f"ingress cap 4 MiB/s {ingress:.3f} s")
    assert free < 0.5
    # tbf lets the first burst (204 KiB) through at once: ~0.95 s for 4 MiB at 4 MiB/s.
    assert 0.8 < egress < 2.0
    assert 0.8 < ingress < 2.0
    assert not sleeper.alive
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in namespaces)


# -- a registry, daemons and containerd, each node in its own namespace ---------------


@dataclass
class Lab:
    lan: Lan
    registry: NsRegistry
    image: Image
    ref: str
    hosts: Path
    ctds: list[Containerd]
    workdir: Path

    def daemons(
        self, nodes: list[Node], peers: Callable[[Node], str], tag: str
    ) -> contextlib.AbstractContextManager[list[NsP2pd]]:
        return _daemons(self, nodes, peers, tag)


@contextlib.contextmanager
def _daemons(lab: Lab, nodes: list[Node], peers: Callable[[Node], str],
             tag: str) -> Iterator[list[NsP2pd]]:
    """Daemons in ``nodes`` (started together), stopped when the block ends."""
    started: list[NsP2pd] = []
    reg = lab.registry
    try:
        for node in nodes:
            started.append(NsP2pd.launch(
                node, lab.workdir / tag / node.name, registries={reg.host: reg.url},
                peers=peers(node), node_id=node.name, peer_port=PEER_PORT))
        for daemon in started:
            daemon.wait_ready(30)
        yield started
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A lan with the registry in a node (image pushed from inside it) and 3 containerds."""
    require_netns()
    require_bins("docker-registry", "skopeo", "containerd", "ctr")
    workdir = tmp_path_factory.mktemp("netns")
    t0 = time.monotonic()
    with Lan(workdir / "lan") as lan, contextlib.ExitStack() as stack:
        reg_node = lan.add_node("registry")
        registry = start_registry(reg_node, workdir / "registry")
        image = build_image(workdir / "image", LAYERS, seed=17)
        ref = reg_node.call(push_image, image, registry.host, REPO)  # skopeo in the node
        hosts = workdir / "hosts"
        # Every node's daemon listens on its own 127.0.0.1:5001: one hosts dir for all.
        subprocess.run(
            [sys.executable, "-m", "p2pd", "containerd-config", "--registry", registry.host,
             "--mirror", "http://127.0.0.1:5001", "--server", registry.url,
             "--hosts-dir", str(hosts)], check=True, capture_output=True)
        ctds = [stack.enter_context(Containerd.start(workdir / f"ctd{i}")) for i in range(3)]
        print(f"\nlab up in {time.monotonic() - t0:.2f} s: {lan}, registry {registry.host}")
        yield Lab(lan, registry, image, ref, hosts, ctds, workdir)


def pull(lab: Lab, ctd: Containerd, node: Node) -> float:
    """``ip netns exec NODE ctr images pull`` (unpacking); returns the seconds it took."""
    ctd.remove_image()
    start = time.monotonic()
    node.run(ctd.ctr_args(*ctd.pull_args(lab.ref, hosts_dir=lab.hosts)), timeout=120)
    took = time.monotonic() - start
    assert lab.ref in ctd.image_refs()
    # Unpacked: one committed snapshot per layer, in the daemon, from content ctr fetched.
    assert len(ctd.snapshot_keys()) == len(lab.image.layers)
    assert {layer.digest for layer in lab.image.layers} <= ctd.content_digests()
    return took


def registry_blob_gets(lab: Lab) -> list[str]:
    """Client addresses of the layer GETs the registry answered so far (its access log)."""
    text = lab.registry.proc.log_text()
    layers = {layer.digest for layer in lab.image.layers}
    return [line.split()[0] for line in text.splitlines()
            if '"GET /v2/' in line and any(d in line for d in layers)]


def test_registry_in_a_namespace_serves_the_pushed_image(lab: Lab) -> None:
    node = lab.registry.node
    digest = node.get(f"{lab.registry.url}/v2/{REPO}/manifests/latest",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert digest.headers["Docker-Content-Digest"] == lab.image.manifest.digest
    assert lab.ref == f"{node.ip}:5000/{REPO}:latest"
    # The registry listens on the node's lan address, not on its loopback.
    with pytest.raises(ConnectionRefusedError):
        node.call(socket.create_connection, ("127.0.0.1", lab.registry.port), 2)


def test_nodes_in_namespaces_take_layers_from_peers(lab: Lab) -> None:
    nodes = [lab.lan.add_node(f"static{i}") for i in range(3)]
    addrs = {node.name: f"{node.ip}:{PEER_PORT}" for node in nodes}

    def static(me: Node) -> str:
        return "static:" + ",".join(a for name, a in addrs.items() if name != me.name)

    t0 = time.monotonic()
    with lab.daemons(nodes, static, "static") as daemons:
        up = time.monotonic() - t0
        layer_bytes = lab.image.layer_bytes
        times = [pull(lab, lab.ctds[0], nodes[0])]
        first = daemons[0]
        assert first.metric("p2pd_blob_bytes_fetched_total", source="upstream") == \
            lab.image.blob_bytes, first.log_text()[-3000:]
        gets_after_first = registry_blob_gets(lab)
        # node0's daemon fetched every layer itself, from node0's address.
        assert len(gets_after_first) >= len(lab.image.layers)
        assert set(gets_after_first) == {nodes[0].ip}
        for i in (1, 2):
            times.append(pull(lab, lab.ctds[i], nodes[i]))
            daemon = daemons[i]
            from_peers = daemon.metric("p2pd_blob_bytes_fetched_total", source="peer")
            upstream = daemon.metric("p2pd_blob_bytes_fetched_total", source="upstream")
            assert from_peers >= 0.95 * layer_bytes, daemon.log_text()[-3000:]
            assert upstream <= 0.05 * layer_bytes
        # No layer left the registry again (no daemon, no ctr fallback asked for one).
        assert registry_blob_gets(lab) == gets_after_first
        settle = wait_for("every daemon sees both others alive", lambda: all(
            d.metric("p2pd_peers", state="alive") == 2 for d in daemons), 10)
        advertised = [re.search(r"advertised as (\S+)", d.log_text()) for d in daemons]
        assert [m.group(1) if m else None for m in advertised] == list(addrs.values())
    print(f"\nstatic swarm in namespaces: daemons up {up:.2f} s; pulls "
          + ", ".join(f"node{i} {t:.2f} s" for i, t in enumerate(times))
          + f"; peers alive after {settle:.2f} s more")


def test_mdns_discovery_across_namespaces(lab: Lab) -> None:
    service = f"p2pn{secrets.token_hex(4)}"  # 12 characters: a DNS-SD service name <= 15
    nodes = [lab.lan.add_node(f"mdns{i}") for i in range(3)]
    t0 = time.monotonic()
    with lab.daemons(nodes, lambda me: f"mdns:{service}@{me.ip}", "mdns") as daemons:
        up = time.monotonic() - t0
        seen = wait_for("the daemons see each other over mDNS", lambda: all(
            d.metric("p2pd_peers", state="alive") == 2 for d in daemons), 20)
        first = pull(lab, lab.ctds[0], nodes[0])
        second = pull(lab, lab.ctds[1], nodes[1])
        assert daemons[0].metric("p2pd_blob_bytes_fetched_total", source="upstream") == \
            lab.image.blob_bytes
        from_peers = daemons[1].metric("p2pd_blob_bytes_fetched_total", source="peer")
        assert from_peers >= 0.95 * lab.image.layer_bytes, daemons[1].log_text()[-3000:]
        # Each announced its lan address, found through the bridge.
        for daemon, node in zip(daemons, nodes, strict=True):
            assert f"at {node.ip}:{PEER_PORT} as" in daemon.log_text()
    print(f"\nmdns swarm in namespaces: daemons up {up:.2f} s, all alive after "
          f"{seen:.2f} s more; pulls {first:.2f} s (registry), {second:.2f} s (peers)")
