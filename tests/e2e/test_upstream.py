"""How p2pd talks to upstream registries: tags, manifests, Accept lines, TLS, timeouts."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from p2pd.lab.daemon import P2pd
from p2pd.lab.images import PushedImage, build_image, push_image
from p2pd.lab.procs import free_port
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def daemon(tmp_path: Path, registry: Registry) -> Iterator[P2pd]:
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    default_registry=registry.host) as d:
        yield d


def _raw_request(port: int, lines: list[str]) -> tuple[int, dict[str, str], bytes]:
    """Send a request with exactly these header lines (repeats kept), return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join([*lines, "Connection: close", "", ""])).encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_every_accept_line_goes_upstream(pushed_image: PushedImage, daemon: P2pd) -> None:
    target = f"/v2/{pushed_image.repo}/manifests/{pushed_image.tag}?ns={pushed_image.registry_host}"
    # The registry refuses an OCI manifest to a client that does not accept OCI; the OCI
    # line comes first, so a mirror that kept only the last Accept line would get a 404.
    status, headers, body = _raw_request(daemon.port, [
        f"GET {target} HTTP/1.1", "Host: x", f"Accept: {OCI_MANIFEST}",
        f"Accept: {DOCKER_MANIFEST}",
    ])
    assert status == 200, body
    assert headers["docker-content-digest"] == pushed_image.image.manifest.digest
    assert headers["content-type"] == OCI_MANIFEST
    assert int(headers["content-length"]) == len(body) == pushed_image.image.manifest.size
    status, _, _ = _raw_request(daemon.port, [
        f"GET {target} HTTP/1.1", "Host: x", f"Accept: {DOCKER_MANIFEST}",
    ])
    assert status == 404  # the registry's own answer, relayed


def test_tags_are_resolved_upstream_every_time(
    tmp_path: Path, pushed_image: PushedImage, registry: Registry, daemon: P2pd,
) -> None:
    url = f"{daemon.url}/v2/{pushed_image.repo}/manifests/latest?ns={registry.host}"
    accept = {"Accept": OCI_MANIFEST}
    first = httpx.head(url, headers=accept, trust_env=False)
    assert first.headers["docker-content-digest"] == pushed_image.image.manifest.digest
    other = build_image(tmp_path / "other", [1 << 20], seed=99)
    push_image(other, registry.host, pushed_image.repo)  # moves the tag
    second = httpx.head(url, headers=accept, trust_env=False)
    assert second.headers["docker-content-digest"] == other.manifest.digest
    assert second.headers["content-length"] == str(other.manifest.size)


def test_manifests_by_digest_are_verified_and_cached(
    pushed_image: PushedImage, registry: Registry, daemon: P2pd,
) -> None:
    digest = pushed_image.image.manifest.digest
    url = f"{daemon.url}/v2/{pushed_image.repo}/manifests/{digest}?ns={registry.host}"
    body = httpx.get(url, headers={"Accept": OCI_MANIFEST}, trust_env=False).content
    assert json.loads(body)["schemaVersion"] == 2
    # With the registry gone, the verified copy is still served (within the access TTL).
    registry.stop()
    again = httpx.get(url, headers={"Accept": OCI_MANIFEST}, trust_env=False)
    assert again.status_code == 200
    assert again.content == body
    assert again.headers["docker-content-digest"] == digest
    # A tag cannot be answered without upstream: p2pd says so, containerd falls back.
    tag = httpx.get(f"{daemon.url}/v2/{pushed_image.repo}/manifests/latest?ns={registry.host}",
                    trust_env=False)
    assert tag.status_code == 503
    assert tag.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_https_registry_with_an_extra_ca_file(tmp_path: Path, image: object) -> None:
    from p2pd.lab.images import Image

    assert isinstance(image, Image)
    with Registry.start(tmp_path / "tls-registry", tls=True) as tls_registry:
        assert tls_registry.ca_file is not None
        subprocess.run(
            ["skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests",
             f"oci:{image.layout_dir}:{image.tag}",
             f"docker://{tls_registry.host}/secure/app:latest"],
            check=True, capture_output=True, timeout=120,
        )
        layer = image.layers[0]
        path = f"/v2/secure/app/blobs/{layer.digest}?ns={tls_registry.host}"
        with P2pd.start(tmp_path / "with-ca", registries={tls_registry.host: tls_registry.url},
                        extra=["--registry-ca", f"{tls_registry.host}={tls_registry.ca_file}"]
                        ) as trusting:
            got = httpx.get(trusting.url + path, trust_env=False, timeout=30)
            assert got.status_code == 200
            assert got.content == image.blob_path(layer.digest).read_bytes()
        with P2pd.start(tmp_path / "without-ca",
                        registries={tls_registry.host: tls_registry.url}) as untrusting:
            refused = httpx.get(untrusting.url + path, trust_env=False, timeout=30)
            assert refused.status_code == 503
            assert untrusting.metric("p2pd_upstream_requests_total", kind="blob",
                                     code="error") >= 1


def test_an_upstream_that_never_answers_gets_a_503_after_the_timeout(tmp_path: Path) -> None:
    # containerd waits forever for a mirror that accepts and never answers, so p2pd must
    # always answer: here within its upstream timeout.
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    host = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        with P2pd.start(tmp_path / "p2pd", registries={host: f"http://{host}"},
                        extra=["--upstream-timeout", "1"]) as daemon:
            started = time.monotonic()
            resp = httpx.get(f"{daemon.url}/v2/a/manifests/latest?ns={host}", trust_env=False,
                             timeout=20)
            assert resp.status_code == 503
            assert time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        silent.close()


def test_requests_without_ns_use_the_default_registry(
    pushed_image: PushedImage, daemon: P2pd,
) -> None:
    layer = pushed_image.image.layers[0]
    got = httpx.get(f"{daemon.url}/v2/{pushed_image.repo}/blobs/{layer.digest}",
                    trust_env=False)
    assert got.status_code == 200
    assert got.headers["docker-content-digest"] == layer.digest
    base = httpx.get(f"{daemon.url}/v2/", trust_env=False)
    assert base.status_code == 200


def test_unknown_registry_host_without_endpoint_fails_over_to_503(tmp_path: Path) -> None:
    port = free_port()
    with P2pd.start(tmp_path / "p2pd") as daemon:
        # No --registry for this host: p2pd tries https://127.0.0.1:PORT, nothing listens.
        resp = httpx.get(f"{daemon.url}/v2/a/manifests/latest?ns=127.0.0.1:{port}",
                         trust_env=False, timeout=30)
        assert resp.status_code == 503
