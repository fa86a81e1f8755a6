"""End-to-end checks of the p2pd.lab harness against real docker-registry / containerd.

Findings from experiments with containerd/ctr 1.6.20 (Debian), recorded here because
they matter for how p2pd configures containerd:

* hosts.toml with ONLY ``server = "..."`` and no ``[host.*]`` table fails to parse
  ("failed to decode hosts.toml" error="invalid `host` tree"). ctr then silently
  ignores the file and pulls from the default host (``http://<registry host>`` with
  --plain-http), so a pull "works" even if ``server`` points at a dead port. Always
  write at least one ``[host."..."]`` table (an empty ``[host]`` table also parses).
* Mirror fallback: with ``[host."<mirror>"] capabilities = ["pull", "resolve"]`` and
  ``server = "<registry>"``, ctr tries the mirror first for the manifest HEAD, the
  manifest GET and every blob GET (each request carries ``?ns=<registry host>``), and
  on failure retries that same request on ``server``. It falls back when the mirror
  answers 503, 500 or 404, and when the mirror refuses the connection. The pull then
  succeeds with every byte coming from ``server``.
* It does NOT fall back when the mirror accepts the connection but never answers
  (the pull hangs; ctr has no response-header timeout), nor when the mirror answers
  200 with wrong bytes (the pull fails with a digest/size error).
* overlayfs snapshotter works in this sandbox (root, ext4), so the lab uses it.
* skopeo 1.9 copying ``oci:`` -> ``docker://`` keeps blobs and the manifest byte for
  byte (same digest) even without --preserve-digests; the lab passes it anyway.
* A killed pull leaves partial ingests (``ctr content active``); the next pull
  resumes them with Range requests, so ``Containerd.remove_image`` deletes them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from p2pd.lab.containerd import Containerd, CtrError
from p2pd.lab.images import Image, PushedImage, build_image, push_image
from p2pd.lab.procs import Proc, free_port, missing_bins
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e


def require_bins(*names: str) -> None:
    missing = missing_bins(*names)
    if missing:
        pytest.skip(f"e2e: required executables not installed: {', '.join(missing)}")


def write_hosts_toml(
    hosts_dir: Path, registry_host: str, server_url: str, mirror_url: str | None
) -> Path:
    """Write ``hosts_dir/<registry_host>/hosts.toml`` for ctr's ``--hosts-dir``.

    Without a mirror the server is also listed as a host, because ctr 1.6 rejects a
    hosts.toml that has no ``[host]`` tree (see the module docstring).
    """
    host = mirror_url if mirror_url is not None else server_url
    path = hosts_dir / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'server = "{server_url}"\n\n[host."{host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return hosts_dir


def _get(url: str, **kwargs: object) -> httpx.Response:
    return httpx.get(url, timeout=30.0, trust_env=False, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- images


def test_build_image_is_deterministic_and_well_formed(
    tmp_path: Path, image: Image, image_spec: tuple[tuple[int, ...], int]
) -> None:
    sizes, seed = image_spec
    again = build_image(tmp_path / "again", sizes, seed=seed)
    assert again.manifest == image.manifest
    assert again.layers == image.layers
    other = build_image(tmp_path / "other", sizes, seed=seed + 1)
    assert other.manifest.digest != image.manifest.digest

    config = json.loads(image.blob_path(image.config.digest).read_bytes())
    assert config["os"] == "linux"
    assert config["rootfs"]["type"] == "layers"
    diff_ids = []
    for i, (layer, size) in enumerate(zip(image.layers, sizes, strict=True)):
        data = image.blob_path(layer.digest).read_bytes()
        assert len(data) == layer.size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
        assert size <= layer.size < size * 1.01 + 4096  # incompressible payload
        plain = gzip.decompress(data)
        assert f"layer{i}/data.bin".encode() in plain[:1024]
        diff_ids.append("sha256:" + hashlib.sha256(plain).hexdigest())
    assert config["rootfs"]["diff_ids"] == diff_ids
    assert image.blob_bytes == image.config.size + sum(b.size for b in image.layers)


def test_registry_serves_pushed_blobs_and_ranges(
    registry: Registry, pushed_image: PushedImage
) -> None:
    reg, image = registry, pushed_image.image
    base = f"{reg.url}/v2/{pushed_image.repo}"
    resp = _get(
        f"{base}/manifests/{pushed_image.tag}",
        headers={"Accept": image.manifest.media_type},
    )
    assert resp.status_code == 200
    assert resp.headers["Docker-Content-Digest"] == image.manifest.digest
    assert resp.content == image.blob_path(image.manifest.digest).read_bytes()

    for blob in image.blobs:
        resp = _get(f"{base}/blobs/{blob.digest}")
        assert resp.status_code == 200
        assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == blob.digest
        assert len(resp.content) == blob.size
        assert reg.blob_path(blob.digest).stat().st_size == blob.size

    layer = image.layers[1]
    expected = image.blob_path(layer.digest).read_bytes()[1000:5000]
    resp = _get(f"{base}/blobs/{layer.digest}", headers={"Range": "bytes=1000-4999"})
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-4999/{layer.size}"
    assert resp.content == expected


def test_push_with_credentials(image: Image, auth_registry: Registry) -> None:
    require_bins("skopeo")
    with pytest.raises(RuntimeError):
        push_image(image, auth_registry.host, "lab/auth")
    ref = push_image(image, auth_registry.host, "lab/auth", creds=("labuser", "labpass"))
    assert ref == f"{auth_registry.host}/lab/auth:latest"
    assert _get(f"{auth_registry.url}/v2/").status_code == 401


# --------------------------------------------------------------------------- procs


def test_proc_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    with Proc.start(["sh", "-c", "sleep 300 & echo child $!; wait"], tmp_path / "p.log") as p:
        deadline = time.monotonic() + 5
        while "child" not in p.log_text():
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.02)
        child = int(p.log_text().split()[1])
        assert p.alive
    assert not p.alive
    # the group got the signal with its leader; the child acts on it a moment later
    deadline = time.monotonic() + 5
    while not _dead(child):
        assert time.monotonic() < deadline, "the child outlived its process group's stop"
        time.sleep(0.02)


def _dead(pid: int) -> bool:
    """True if ``pid`` is gone or a zombie (orphans may not be reaped by PID 1 here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


# --------------------------------------------------------------------------- containerd


def test_ctr_pull_direct_from_registry(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage, containerd: Containerd
) -> None:
    hosts = write_hosts_toml(tmp_path / "hosts", registry.host, registry.url, None)
    res = containerd.pull(pushed_image.ref, hosts_dir=hosts)
    assert "failed to decode hosts.toml" not in res.stderr
    assert pushed_image.ref in containerd.image_refs()
    image = pushed_image.image
    digests = containerd.content_digests()
    assert {b.digest for b in image.layers} <= digests
    assert {image.manifest.digest, image.config.digest} <= digests
    check = containerd.ctr("images", "check").stdout
    assert "complete (4/4)" in check
    assert len(containerd.snapshot_keys()) == len(image.layers)  # unpacked


def test_remove_image_forces_full_redownload(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage, containerd: Containerd
) -> None:
    reg, image = registry, pushed_image.image
    with TcpProxy.to(reg.host) as proxy:
        hosts = write_hosts_toml(tmp_path / "hosts", reg.host, proxy.url, None)
        containerd.pull(pushed_image.ref, hosts_dir=hosts)
        first = proxy.downstream_bytes
        assert first >= image.blob_bytes

        containerd.remove_image(pushed_image.ref)
        assert containerd.image_refs() == set()
        assert containerd.content_digests() == set()
        assert containerd.snapshot_keys() == []

        proxy.reset_counts()
        containerd.pull(pushed_image.ref, hosts_dir=hosts)
        assert proxy.downstream_bytes >= image.layer_bytes
        assert pushed_image.ref in containerd.image_refs()


def test_killed_pull_can_be_restarted(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage, containerd: Containerd
) -> None:
    reg, image = registry, pushed_image.image
    with TcpProxy.to(reg.host, rate=1_000_000) as proxy:
        hosts = write_hosts_toml(tmp_path / "hosts", reg.host, proxy.url, None)
        with containerd.pull_popen(
            pushed_image.ref, hosts_dir=hosts, log_path=tmp_path / "pull.log"
        ) as pull:
            deadline = time.monotonic() + 20
            while proxy.downstream_bytes < 1_000_000:
                assert pull.alive, pull.log_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            pull.kill()
        assert pushed_image.ref not in containerd.image_refs()
        assert containerd.active_ingests()  # partial downloads left behind

        proxy.set_rate(None)
        containerd.remove_image()
        assert containerd.active_ingests() == set()
        proxy.reset_counts()
        containerd.pull(pushed_image.ref, hosts_dir=hosts)
        assert proxy.downstream_bytes >= image.layer_bytes


def test_pull_with_basic_auth(
    tmp_path: Path, image: Image, auth_registry: Registry, containerd: Containerd
) -> None:
    require_bins("skopeo")
    creds = auth_registry.creds
    assert creds is not None
    ref = push_image(image, auth_registry.host, "lab/auth", creds=creds)
    hosts = write_hosts_toml(tmp_path / "hosts", auth_registry.host, auth_registry.url, None)

    with pytest.raises(CtrError) as err:
        containerd.pull(ref, hosts_dir=hosts)
    assert "401" in str(err.value) or "unauthorized" in str(err.value).lower()
    assert ref not in containerd.image_refs()

    containerd.pull(ref, hosts_dir=hosts, user=f"{creds[0]}:{creds[1]}")
    assert ref in containerd.image_refs()


# --------------------------------------------------------------------------- proxy


def test_proxy_rate_limit_slows_and_can_be_lifted(
    registry: Registry, pushed_image: PushedImage
) -> None:
    reg, image = registry, pushed_image.image
    layer = image.layers[1]  # 3 MiB
    url_path = f"/v2/{pushed_image.repo}/blobs/{layer.digest}"
    with TcpProxy.to(reg.host) as proxy:
        start = time.monotonic()
        assert len(_get(proxy.url + url_path).content) == layer.size
        assert time.monotonic() - start < 1.0  # unlimited baseline
        assert proxy.downstream_bytes >= layer.size
        assert proxy.upstream_bytes > 0

        proxy.reset_counts()
        proxy.set_rate(1_000_000)
        start = time.monotonic()
        slow: float | None = None
        with httpx.stream("GET", proxy.url + url_path, trust_env=False) as resp:
            got = 0
            for chunk in resp.iter_bytes():
                got += len(chunk)
                if got >= 2_000_000 and slow is None:
                    slow = time.monotonic() - start
                    proxy.set_rate(None)
        total = time.monotonic() - start
        assert got == layer.size
        assert slow is not None
        # 2 MB at 1 MB/s (0.1 s burst) ~ 1.9 s; the remaining 1.1 MB is then instant.
        assert 1.5 <= slow < 4.0
        assert total - slow < 1.0


def test_proxy_close_aborts_live_connections(registry: Registry, pushed_image: PushedImage) -> None:
    reg, image = registry, pushed_image.image
    layer = image.layers[2]
    errors: list[BaseException] = []
    with TcpProxy.to(reg.host, rate=200_000) as proxy:

        def fetch() -> None:
            try:
                _get(f"{proxy.url}/v2/{pushed_image.repo}/blobs/{layer.digest}")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=fetch, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while proxy.downstream_bytes == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        proxy.close()
        t.join(5)
        assert not t.is_alive()
        assert time.monotonic() - start < 2.0
    assert errors and isinstance(errors[0], httpx.HTTPError)
    assert proxy.active_connections == 0


# --------------------------------------------------------------------------- fallback


@contextmanager
def failing_mirror(status: int) -> Iterator[tuple[str, list[str]]]:
    """A tiny HTTP server answering ``status`` with an OCI error body to everything."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            hits.append(f"{self.command} {self.path}")
            body = json.dumps(
                {"errors": [{"code": "UNAVAILABLE", "message": "mirror says no"}]}
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _reply

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("mode", ["503", "404", "refused"])
def test_ctr_falls_back_to_server_when_mirror_fails(
    tmp_path: Path,
    registry: Registry,
    pushed_image: PushedImage,
    containerd: Containerd,
    mode: str,
) -> None:
    reg, image = registry, pushed_image.image
    with ExitStack() as stack:
        upstream = stack.enter_context(TcpProxy.to(reg.host))
        hits: list[str] = []
        if mode == "refused":
            mirror_url = f"http://127.0.0.1:{free_port()}"
        else:
            mirror_url, hits = stack.enter_context(failing_mirror(int(mode)))
        hosts = write_hosts_toml(tmp_path / "hosts", reg.host, upstream.url, mirror_url)
        containerd.pull(pushed_image.ref, hosts_dir=hosts, timeout=60)
        assert pushed_image.ref in containerd.image_refs()
        assert upstream.downstream_bytes >= image.blob_bytes
        if mode != "refused":
            # The mirror was asked first for the manifest and for every blob.
            assert any(h.startswith("HEAD") and "/manifests/" in h for h in hits)
            for blob in image.blobs:
                assert any(blob.digest in h for h in hits), blob.digest
            assert all(f"ns={reg.host.replace(':', '%3A')}" in h for h in hits)


def test_sigterm_is_enough_to_stop_lab_daemons(registry: Registry, containerd: Containerd) -> None:
    registry.proc.popen.send_signal(signal.SIGTERM)
    containerd.proc.popen.send_signal(signal.SIGTERM)
    assert registry.proc.wait(10) is not None
    assert containerd.proc.wait(10) is not None
