"""The piece cache across restarts, crashes, damage on disk and eviction.

Real docker-registry, real ``p2pd run`` processes; blobs are fetched with plain HTTP GETs
the way containerd asks a mirror for them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from p2pd.lab.daemon import P2pd
from p2pd.lab.images import Blob, Image, PushedImage, build_image, push_image
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
MiB = 1 << 20


# -- helpers --------------------------------------------------------------------------


def blob_target(repo: str, registry_host: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{digest}?ns={registry_host}"


def get_blob(daemon: P2pd, repo: str, registry_host: str, digest: str) -> tuple[int, bytes]:
    """GET a blob; return the status and the bytes received (possibly cut short)."""
    body = bytearray()
    url = daemon.url + blob_target(repo, registry_host, digest)
    with httpx.stream("GET", url, timeout=60, trust_env=False) as resp:
        try:
            for chunk in resp.iter_raw():
                body += chunk
        except httpx.HTTPError:
            pass  # an aborted body: the caller looks at what arrived
        return resp.status_code, bytes(body)


def blob_dir(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


def piece_files(cache_dir: Path, digest: str) -> list[Path]:
    directory = blob_dir(cache_dir, digest)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.name.isdigit()),
                  key=lambda p: int(p.name))


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def truth(image: Image, blob: Blob) -> bytes:
    return image.blob_path(blob.digest).read_bytes()


def disk_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "blobs").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Two 16 MiB layers and a 1 MiB one."""
    return build_image(tmp_path_factory.mktemp("big") / "layout", [16 * MiB, 16 * MiB, MiB],
                       seed=101)


@pytest.fixture(scope="module")
def five_mib_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Three layers of a little over 5 MiB."""
    return build_image(tmp_path_factory.mktemp("five") / "layout", [5 * MiB] * 3, seed=202)


@pytest.fixture(scope="module")
def three_mib_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Four layers of a little over 3 MiB."""
    return build_image(tmp_path_factory.mktemp("three") / "layout", [3 * MiB] * 4, seed=303)


@pytest.fixture
def daemon(tmp_path: Path, registry: Registry) -> Iterator[P2pd]:
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url}) as d:
        yield d


# -- a. restart --------------------------------------------------------------------------


def test_a_restarted_daemon_serves_every_blob_from_its_cache(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage,
) -> None:
    image, repo, host = pushed_image.image, pushed_image.repo, pushed_image.registry_host
    blobs = {blob.digest: truth(image, blob) for blob in image.blobs}
    cache = tmp_path / "cache"
    registries = {registry.host: registry.url}
    with P2pd.start(tmp_path / "first", registries=registries, cache_dir=cache) as first:
        for digest, data in blobs.items():
            assert get_blob(first, repo, host, digest) == (200, data)
        assert first.metric("p2pd_cache_blobs") == len(blobs)
        assert first.metric("p2pd_blob_bytes_fetched_total", source="upstream") == \
            image.blob_bytes

    with P2pd.start(tmp_path / "second", registries=registries, cache_dir=cache) as second:
        assert second.metric("p2pd_cache_blobs") == len(blobs)
        assert second.metric("p2pd_cache_bytes") == image.blob_bytes
        for digest, data in blobs.items():
            assert get_blob(second, repo, host, digest) == (200, data)
        assert second.metric("p2pd_cache_hits_total") == len(blobs)
        assert second.metric("p2pd_cache_misses_total") == 0
        assert second.metric("p2pd_blob_bytes_fetched_total", source="upstream") == 0
        assert second.metric("p2pd_upstream_blob_fetches_total") == 0
        assert second.metric("p2pd_blob_bytes_served_total", source="cache") == image.blob_bytes
        assert second.metric("p2pd_cache_blobs") == len(blobs)


# -- b. kill -9 mid-download ------------------------------------------------------------


def test_kill_9_mid_download_leaves_no_partial_blob_after_restart(
    tmp_path: Path, registry: Registry, big_image: Image,
) -> None:
    push_image(big_image, registry.host, "cache/big")
    layer = big_image.layers[0]
    data = truth(big_image, layer)
    with TcpProxy.to(registry.host, rate=2 * MiB) as proxy:
        daemon = P2pd.start(tmp_path / "p2pd", registries={registry.host: proxy.url})
        try:
            cache = daemon.cache_dir
            partial: list[tuple[int, bytes]] = []

            def fetch() -> None:
                try:
                    partial.append(get_blob(daemon, "cache/big", registry.host, layer.digest))
                except httpx.HTTPError:
                    partial.append((0, b""))

            reader = threading.Thread(target=fetch, daemon=True)
            reader.start()
            wait_for("a first piece on disk", lambda: len(piece_files(cache, layer.digest)) >= 1)
            daemon.kill()
            reader.join(timeout=30)
            assert not reader.is_alive()
            assert len(partial[0][1]) < layer.size  # the download really was cut
            assert piece_files(cache, layer.digest), "the killed daemon left no pieces"
            assert not (blob_dir(cache, layer.digest) / "table").exists()

            proxy.set_rate(None)
            daemon.restart()
            assert not blob_dir(cache, layer.digest).exists()
            assert list((cache / "tmp").iterdir()) == []
            assert list((cache / "blobs" / "sha256").iterdir()) == []
            assert daemon.metric("p2pd_cache_blobs") == 0

            assert get_blob(daemon, "cache/big", registry.host, layer.digest) == (200, data)
            assert (blob_dir(cache, layer.digest) / "table").exists()
            assert list((cache / "tmp").iterdir()) == []
            assert daemon.metric("p2pd_cache_blobs") == 1
        finally:
            daemon.stop()


# -- c. a piece damaged while the daemon is stopped ---------------------------------------


@pytest.mark.parametrize("which", [0, 2, -1], ids=["first", "middle", "last"])
def test_a_piece_changed_while_stopped_is_never_served(
    registry: Registry, pushed_image: PushedImage, daemon: P2pd, which: int,
) -> None:
    image, repo, host = pushed_image.image, pushed_image.repo, pushed_image.registry_host
    layer = max(image.layers, key=lambda b: b.size)  # a little over 5 MiB: 6 pieces
    data = truth(image, layer)
    assert get_blob(daemon, repo, host, layer.digest) == (200, data)
    daemon.stop()

    piece = piece_files(daemon.cache_dir, layer.digest)[which]
    original = piece.read_bytes()
    damaged = bytes(b ^ 0x5A for b in original[:4096]) + original[4096:]
    piece.write_bytes(damaged)
    assert piece.stat().st_size == len(original)

    daemon.restart()
    status, body = get_blob(daemon, repo, host, layer.digest)
    if status == 200:
        # Whole and right, or cut short before the damaged piece: never the wrong bytes.
        assert body == data or (len(body) < len(data) and data.startswith(body))
    else:
        assert status >= 500 and not body.startswith(damaged[:64])
    assert daemon.metric("p2pd_corrupt_pieces_total") >= 1
    assert get_blob(daemon, repo, host, layer.digest) == (200, data)


# -- d. eviction ---------------------------------------------------------------------------


def test_eviction_keeps_the_cache_under_its_size(
    tmp_path: Path, registry: Registry, five_mib_image: Image,
) -> None:
    push_image(five_mib_image, registry.host, "cache/five")
    layers = five_mib_image.layers
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    extra=["--cache-size", "12MiB", "--cache-high", "0.9",
                           "--cache-low", "0.5"]) as daemon:
        for layer in layers:
            status, body = get_blob(daemon, "cache/five", registry.host, layer.digest)
            assert status == 200 and body == truth(five_mib_image, layer)
        assert daemon.metric("p2pd_cache_evictions_total") >= 1
        assert daemon.metric("p2pd_cache_bytes") <= 12 * MiB
        assert disk_bytes(daemon.cache_dir) <= 12 * MiB
        assert not blob_dir(daemon.cache_dir, layers[0].digest).exists()
        assert (blob_dir(daemon.cache_dir, layers[-1].digest) / "table").exists()
        present = [layer for layer in layers if blob_dir(daemon.cache_dir, layer.digest).exists()]
        assert daemon.metric("p2pd_cache_blobs") == len(present)
        assert daemon.metric("p2pd_cache_bytes") == sum(layer.size for layer in present)
        # An evicted blob is fetched again, whole.
        status, body = get_blob(daemon, "cache/five", registry.host, layers[0].digest)
        assert status == 200 and body == truth(five_mib_image, layers[0])


def test_eviction_spares_a_blob_read_recently(
    tmp_path: Path, registry: Registry, three_mib_image: Image,
) -> None:
    push_image(three_mib_image, registry.host, "cache/three")
    a, b, c, d = three_mib_image.layers
    # high 10.8 MiB: a+b+c (9 MiB) fit; d makes 12 MiB, eviction down to 9.6 MiB: one blob.
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    extra=["--cache-size", "12MiB", "--cache-high", "0.9",
                           "--cache-low", "0.8"]) as daemon:
        for layer in (a, b, c, a, d):
            status, body = get_blob(daemon, "cache/three", registry.host, layer.digest)
            assert status == 200 and body == truth(three_mib_image, layer)
        assert daemon.metric("p2pd_cache_hits_total") == 1
        assert daemon.metric("p2pd_cache_evictions_total") == 1
        assert (blob_dir(daemon.cache_dir, d.digest) / "table").exists()
        assert (blob_dir(daemon.cache_dir, c.digest) / "table").exists()
        assert not blob_dir(daemon.cache_dir, b.digest).exists(), "b was least recently used"
        assert (blob_dir(daemon.cache_dir, a.digest) / "table").exists(), "a was just read"


# -- e. a blob being served is not evicted under its reader --------------------------------


class StalledGet:
    """A blob GET on a raw socket whose body is read only on request.

    The receive buffer is fixed small before connecting (no autotuning), so while this
    client does not read, the daemon can push at most its send buffer ahead and stays
    in the middle of the response.
    """

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.sock.settimeout(60)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          "Connection: close\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed before the response head"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        self.length = int(headers["content-length"])
        self.body = bytearray(rest)

    def read(self, until: int) -> None:
        while len(self.body) < until:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.body += chunk

    def close(self) -> None:
        self.sock.close()


def test_a_blob_being_served_is_not_evicted_under_its_reader(
    tmp_path: Path, registry: Registry, big_image: Image,
) -> None:
    push_image(big_image, registry.host, "cache/pin")
    a, b, c = big_image.layers  # 16 MiB, 16 MiB, 1 MiB
    # high 21.6 MiB, low 12 MiB: a cached plus b incoming (32 MiB) calls for evicting a.
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    extra=["--cache-size", "24MiB", "--cache-high", "0.9",
                           "--cache-low", "0.5"]) as daemon:
        cache = daemon.cache_dir
        assert get_blob(daemon, "cache/pin", registry.host, a.digest) == \
            (200, truth(big_image, a))

        reader = StalledGet(daemon.port, blob_target("cache/pin", registry.host, a.digest))
        try:
            assert (reader.status, reader.length) == (200, a.size)
            reader.read(64 * 1024)
            time.sleep(0.5)  # let the daemon fill the socket buffers and block
            assert daemon.metric("p2pd_blob_bytes_served_total", source="cache") < a.size

            status, body = get_blob(daemon, "cache/pin", registry.host, b.digest)
            assert status == 200 and body == truth(big_image, b)
            # b's download wanted room, yet a, being served, stayed whole.
            served = daemon.metric("p2pd_blob_bytes_served_total", source="cache")
            assert served < a.size, "a's response was no longer in progress"
            assert daemon.metric("p2pd_cache_evictions_total") == 0
            assert len(piece_files(cache, a.digest)) == -(-a.size // MiB)
            assert (blob_dir(cache, a.digest) / "table").exists()

            reader.read(a.size)
            assert bytes(reader.body) == truth(big_image, a)
        finally:
            reader.close()

        # Once its response is over, a is evictable again: the pin, not luck, kept it.
        wait_for("a's response to finish", lambda: daemon.metric(
            "p2pd_blob_serve_seconds_count", source="cache") >= 1)
        status, body = get_blob(daemon, "cache/pin", registry.host, c.digest)
        assert status == 200 and body == truth(big_image, c)
        assert daemon.metric("p2pd_cache_evictions_total") >= 1
        assert not blob_dir(cache, a.digest).exists()
        assert daemon.metric("p2pd_aborted_responses_total") == 0
        assert daemon.metric("p2pd_corrupt_pieces_total") == 0
