"""containerd pulls through one p2pd daemon: real docker-registry, containerd, ctr, skopeo."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd
from p2pd.lab.images import Image, PushedImage, build_image, push_image
from p2pd.lab.procs import free_port
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def containerd_config(hosts_dir: Path, registry: str, mirror: str, server: str) -> None:
    """Wire containerd to the mirror with p2pd's own command, as an operator would."""
    subprocess.run(
        [sys.executable, "-m", "p2pd", "containerd-config", "--registry", registry,
         "--mirror", mirror, "--server", server, "--hosts-dir", str(hosts_dir)],
        check=True, capture_output=True, text=True,
    )


@pytest.fixture
def counted_registry(registry: Registry) -> Iterator[TcpProxy]:
    """A byte-counting proxy in front of the registry: p2pd's upstream goes through it."""
    with TcpProxy.to(registry.host) as proxy:
        yield proxy


@pytest.fixture
def daemon(tmp_path: Path, registry: Registry, counted_registry: TcpProxy) -> Iterator[P2pd]:
    with P2pd.start(
        tmp_path / "p2pd",
        registries={registry.host: counted_registry.url},
        default_registry=registry.host,
    ) as d:
        yield d


def test_ctr_pull_goes_through_p2pd_and_the_second_pull_comes_from_its_cache(
    tmp_path: Path, pushed_image: PushedImage, registry: Registry, counted_registry: TcpProxy,
    daemon: P2pd, containerd: Containerd,
) -> None:
    image = pushed_image.image
    hosts = tmp_path / "hosts"
    containerd_config(hosts, registry.host, daemon.url, registry.url)

    containerd.pull(pushed_image.ref, hosts_dir=hosts)
    assert pushed_image.ref in containerd.image_refs()
    assert containerd.snapshot_keys(), "the image was not unpacked"
    fetched = daemon.metric("p2pd_blob_bytes_fetched_total", source="upstream")
    assert fetched == image.blob_bytes
    assert daemon.metric("p2pd_blob_bytes_served_total", source="download") == image.blob_bytes
    assert daemon.metric("p2pd_upstream_blob_fetches_total") == len(image.layers) + 1

    containerd.remove_image(pushed_image.ref)
    counted_registry.reset_counts()
    containerd.pull(pushed_image.ref, hosts_dir=hosts)
    assert containerd.snapshot_keys()
    assert daemon.metric("p2pd_blob_bytes_fetched_total", source="upstream") == fetched
    assert daemon.metric("p2pd_blob_bytes_served_total", source="cache") == image.blob_bytes
    # The registry only answered small requests (tag resolution, access checks).
    assert counted_registry.downstream_bytes < 64 * 1024
    assert "from=cache" in daemon.log_text()


def test_containerd_falls_back_to_the_registry_when_p2pd_cannot_serve(
    tmp_path: Path, pushed_image: PushedImage, registry: Registry, containerd: Containerd,
) -> None:
    # A p2pd whose upstream is unreachable answers 503 to everything it is asked.
    dead = f"http://127.0.0.1:{free_port()}"
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: dead}) as broken:
        hosts = tmp_path / "hosts"
        containerd_config(hosts, registry.host, broken.url, registry.url)
        containerd.pull(pushed_image.ref, hosts_dir=hosts)
        assert pushed_image.ref in containerd.image_refs()
        assert broken.metric("p2pd_upstream_requests_total", kind="manifest", code="error") >= 1
    # No p2pd listening at all: the connection is refused, the pull still works.
    containerd.remove_image(pushed_image.ref)
    hosts2 = tmp_path / "hosts2"
    containerd_config(hosts2, registry.host, f"http://127.0.0.1:{free_port()}", registry.url)
    containerd.pull(pushed_image.ref, hosts_dir=hosts2)
    assert pushed_image.ref in containerd.image_refs()


def test_interrupted_ctr_pull_resumes_with_range(
    tmp_path: Path, registry: Registry, counted_registry: TcpProxy, daemon: P2pd,
    containerd: Containerd,
) -> None:
    image = build_image(tmp_path / "big", [24 * MiB], seed=7)
    push_image(image, registry.host, "resume/big")
    ref = f"{registry.host}/resume/big:latest"
    hosts = tmp_path / "hosts"
    containerd_config(hosts, registry.host, daemon.url, registry.url)

    counted_registry.set_rate(4 * MiB)
    pull = containerd.pull_popen(ref, hosts_dir=hosts, log_path=tmp_path / "pull1.log")
    deadline = time.monotonic() + 30
    while daemon.metric("p2pd_blob_bytes_served_total", source="download") < 6 * MiB:
        assert time.monotonic() < deadline, "the first pull made no progress"
        assert pull.alive, pull.log_text()
        time.sleep(0.1)
    pull.kill()
    assert containerd.active_ingests(), "containerd kept no partial download to resume"
    counted_registry.set_rate(None)

    containerd.pull(ref, hosts_dir=hosts)
    assert ref in containerd.image_refs()
    assert daemon.metric("p2pd_blob_requests_total", method="GET", code="206") >= 1
    assert "bytes " in daemon.log_text()  # the resumed request logged its Content-Range


def _blob_url(daemon: P2pd, pushed: PushedImage, digest: str) -> str:
    return f"{daemon.url}/v2/{pushed.repo}/blobs/{digest}?ns={pushed.registry_host}"


def _piece_files(daemon: P2pd, digest: str) -> list[Path]:
    directory = daemon.cache_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    return sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _get(url: str) -> tuple[int, bytes, int | None]:
    """GET url; return status, the bytes received (possibly truncated), declared length."""
    body = bytearray()
    with httpx.stream("GET", url, timeout=30, trust_env=False) as resp:
        declared = resp.headers.get("content-length")
        try:
            for chunk in resp.iter_raw():
                body += chunk
        except httpx.HTTPError:
            pass
        return resp.status_code, bytes(body), int(declared) if declared else None


def test_a_corrupted_piece_in_the_cache_never_reaches_the_client(
    pushed_image: PushedImage, daemon: P2pd, containerd: Containerd, tmp_path: Path,
    registry: Registry,
) -> None:
    layer = max(pushed_image.image.layers, key=lambda b: b.size)  # a little over 5 MiB: 6 pieces
    truth = pushed_image.image.blob_path(layer.digest).read_bytes()
    url = _blob_url(daemon, pushed_image, layer.digest)
    assert _get(url)[1] == truth
    pieces = _piece_files(daemon, layer.digest)
    assert len(pieces) >= 3

    # Damage a middle piece: the client gets a truncated body, never the bad bytes.
    bad = bytearray(pieces[2].read_bytes())
    bad[100:110] = b"XXXXXXXXXX"
    pieces[2].write_bytes(bytes(bad))
    status, body, declared = _get(url)
    assert status == 200 and declared == len(truth)
    assert len(body) < len(truth)
    assert truth.startswith(body)
    assert daemon.metric("p2pd_corrupt_pieces_total") == 1

    # The damaged blob was dropped; the next request fetches it again, whole and right.
    assert _get(url)[1] == truth

    # Damage the first piece: detected before the answer starts, fetched again silently.
    first = _piece_files(daemon, layer.digest)[0]
    first.write_bytes(b"\0" * first.stat().st_size)
    assert _get(url)[1] == truth
    assert daemon.metric("p2pd_corrupt_pieces_total") == 2

    # And containerd pulls the image fine with the damage in place.
    pieces = _piece_files(daemon, layer.digest)
    pieces[-1].write_bytes(b"\1" * pieces[-1].stat().st_size)
    hosts = tmp_path / "hosts"
    containerd_config(hosts, registry.host, daemon.url, registry.url)
    containerd.pull(pushed_image.ref, hosts_dir=hosts)
    assert pushed_image.ref in containerd.image_refs()


def test_upstream_bytes_that_do_not_match_the_digest_are_aborted_and_not_cached(
    pushed_image: PushedImage, daemon: P2pd, registry: Registry,
) -> None:
    layer = max(pushed_image.image.layers, key=lambda b: b.size)
    stored = registry.blob_path(layer.digest)
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0xFF  # only the last piece differs: everything before it streams out
    stored.write_bytes(bytes(data))
    status, body, declared = _get(_blob_url(daemon, pushed_image, layer.digest))
    assert status == 200 and declared == layer.size
    assert len(body) < layer.size
    assert daemon.metric("p2pd_digest_mismatches_total") == 1
    blob_dir = daemon.cache_dir / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
    assert not blob_dir.exists()


def test_ten_clients_asking_at_once_cause_one_upstream_fetch(
    pushed_image: PushedImage, daemon: P2pd, counted_registry: TcpProxy,
) -> None:
    import concurrent.futures

    layer = max(pushed_image.image.layers, key=lambda b: b.size)
    truth = pushed_image.image.blob_path(layer.digest).read_bytes()
    counted_registry.set_rate(10 * MiB)  # slow enough that all ten overlap
    counted_registry.reset_counts()
    url = _blob_url(daemon, pushed_image, layer.digest)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: _get(url), range(10)))
    assert all(body == truth for _, body, _ in results)
    assert daemon.metric("p2pd_upstream_blob_fetches_total") == 1
    assert daemon.metric("p2pd_upstream_requests_total", kind="blob", code="200") <= 11
    # One copy of the blob left the registry (plus HTTP headers of the HEAD checks).
    assert counted_registry.downstream_bytes < layer.size + 64 * 1024


def test_bad_requests_are_refused_without_touching_cache_or_upstream(
    pushed_image: PushedImage, daemon: P2pd,
) -> None:
    layer = pushed_image.image.layers[0]
    ns = f"?ns={pushed_image.registry_host}"
    cases = [
        (f"/v2/{pushed_image.repo}/blobs/sha256:abc{ns}", 400, "DIGEST_INVALID"),
        (f"/v2/{pushed_image.repo}/blobs/md5:{'0' * 32}{ns}", 400, "DIGEST_INVALID"),
        (f"/v2/../etc/blobs/{layer.digest}{ns}", 400, "NAME_INVALID"),
        (f"/v2/a/../../b/blobs/{layer.digest}{ns}", 400, "NAME_INVALID"),
        (f"/v2/{'a' * 300}/blobs/{layer.digest}{ns}", 400, "NAME_INVALID"),
        (f"/v2/UPPER/manifests/latest{ns}", 400, "NAME_INVALID"),
        (f"/v2/{pushed_image.repo}/blobs/{layer.digest}?ns=bad%20host", 400, "NAME_INVALID"),
    ]
    for target, status, code in cases:
        # Sent verbatim: HTTP clients would normalise "..", an attacker's would not.
        got, body = _raw_get(daemon.port, target)
        assert got == status, target
        assert json.loads(body)["errors"][0]["code"] == code, target
    with httpx.Client(base_url=daemon.url, trust_env=False) as client:
        assert daemon.metric("p2pd_upstream_requests_total", kind="blob", code="200") == 0
        resp = client.get(f"/v2/{pushed_image.repo}/blobs/{layer.digest}{ns}",
                          headers={"Range": f"bytes={layer.size}-"})
        assert resp.status_code == 416
        assert resp.headers["content-range"] == f"bytes */{layer.size}"
        resp = client.get(f"/v2/{pushed_image.repo}/blobs/{layer.digest}{ns}",
                          headers={"Range": "bytes=oops"})
        assert resp.status_code == 400
        assert client.get("/healthz").status_code == 200
    assert not any((daemon.cache_dir / "blobs" / "sha256").iterdir())
    assert daemon.proc.alive


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_range_requests_on_cached_and_downloading_blobs(
    pushed_image: PushedImage, daemon: P2pd,
) -> None:
    layer = max(pushed_image.image.layers, key=lambda b: b.size)
    truth = pushed_image.image.blob_path(layer.digest).read_bytes()
    url = _blob_url(daemon, pushed_image, layer.digest)
    with httpx.Client(trust_env=False, timeout=30) as client:
        for header, expect in [("bytes=1000-", truth[1000:]),
                               ("bytes=1048570-2097160", truth[1048570:2097161]),
                               ("bytes=-10", truth[-10:])]:
            resp = client.get(url, headers={"Range": header})
            assert resp.status_code == 206, header
            assert resp.content == expect, header
        head = client.head(url)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(layer.size)
        assert head.headers["docker-content-digest"] == layer.digest
        assert hashlib.sha256(client.get(url).content).hexdigest() == layer.digest[7:]


def test_auth_passthrough_with_htpasswd_registry(
    tmp_path: Path, image: Image, auth_registry: Registry, containerd: Containerd,
) -> None:
    user, password = "labuser", "labpass"
    push_image(image, auth_registry.host, "private/app", creds=(user, password))
    ref = f"{auth_registry.host}/private/app:latest"
    with P2pd.start(tmp_path / "p2pd", registries={auth_registry.host: auth_registry.url},
                    default_registry=auth_registry.host) as daemon:
        hosts = tmp_path / "hosts"
        containerd_config(hosts, auth_registry.host, daemon.url, auth_registry.url)
        refused = containerd.pull(ref, hosts_dir=hosts, check=False)
        assert refused.returncode != 0
        assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower()

        containerd.pull(ref, hosts_dir=hosts, user=f"{user}:{password}")
        assert ref in containerd.image_refs()
        assert daemon.metric("p2pd_blob_bytes_fetched_total", source="upstream") == \
            image.blob_bytes

        # The layers are cached now, but a client without credentials still gets nothing.
        layer = image.layers[0]
        resp = httpx.get(f"{daemon.url}/v2/private/app/blobs/{layer.digest}"
                         f"?ns={auth_registry.host}", trust_env=False)
        assert resp.status_code == 401
        assert "www-authenticate" in resp.headers
        assert resp.json()["errors"][0]["code"] == "UNAUTHORIZED"
        containerd.remove_image(ref)
        refused = containerd.pull(ref, hosts_dir=hosts, check=False)
        assert refused.returncode != 0


def test_skopeo_copies_through_p2pd_as_a_registries_conf_mirror(
    tmp_path: Path, pushed_image: PushedImage, daemon: P2pd,
) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nlocation = "{pushed_image.registry_host}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "127.0.0.1:{daemon.port}"\ninsecure = true\n'
    )
    out = tmp_path / "copy"
    subprocess.run(
        ["skopeo", "--registries-conf", str(conf), "copy", "--src-tls-verify=false",
         f"docker://{pushed_image.ref}", f"oci:{out}:latest"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    for blob in pushed_image.image.layers:
        copied = out / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == blob.digest[7:]
    assert daemon.metric("p2pd_blob_bytes_served_total", source="download") == \
        pushed_image.image.blob_bytes
