"""The peer port of a real daemon: serving pieces, the cluster secret, hostile peers."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pd.core.bitfield import full_bitfield
from p2pd.core.messages import PROTOCOL_VERSION, Have, Hello, Ping, Request
from p2pd.core.pieces import PieceLayout
from p2pd.core.protocol import encode_frame
from p2pd.io.peer import PeerUnavailable, open_peer_link
from p2pd.lab.daemon import P2pd
from p2pd.lab.images import PushedImage
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
SECRET = b"correct horse battery staple 42"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return path


def _start(tmp_path: Path, registry: Registry, *extra: str) -> P2pd:
    return P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                      default_registry=registry.host, peer_port=0, node_id="node-a",
                      extra=list(extra))


def _fill(daemon: P2pd, pushed: PushedImage) -> None:
    for blob in pushed.image.blobs:
        got = httpx.get(f"{daemon.url}/v2/{pushed.repo}/blobs/{blob.digest}", trust_env=False)
        assert got.status_code == 200


async def test_a_peer_gets_every_piece_of_a_cached_blob_and_a_refusal_for_others(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage,
) -> None:
    with _start(tmp_path, registry) as daemon:
        _fill(daemon, pushed_image)
        layer = max(pushed_image.image.layers, key=lambda b: b.size)
        truth = pushed_image.image.blob_path(layer.digest).read_bytes()
        layout = PieceLayout.for_size(layer.size)
        haves: list[tuple[str, Have]] = []
        async with open_peer_link(daemon.peer_addr, "node-b", None,
                                  on_have=lambda peer, have: haves.append((peer, have))) as link:
            assert link.peer_id == "node-a"
            pieces = [await link.request_piece(layer.digest, layer.size, i)
                      for i in range(layout.count)]
            assert b"".join(p or b"" for p in pieces) == truth
            missing = "sha256:" + "0" * 64
            assert await link.request_piece(missing, layer.size, 0) is None
            # A size that does not match what this node holds is a different blob.
            assert await link.request_piece(layer.digest, layer.size + 1, 0) is None
        assert daemon.metric("p2pd_peer_bytes_uploaded_total") == layer.size
        # Before its first piece the asker was told what the daemon holds, once.
        assert haves == [("node-a", Have(layer.digest, layer.size, layout.piece_size,
                                         full_bitfield(layout.count), True))]


async def test_with_a_cluster_secret_only_peers_that_know_it_get_pieces(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage, secret_file: Path,
) -> None:
    with _start(tmp_path, registry, "--cluster-secret-file", str(secret_file)) as daemon:
        _fill(daemon, pushed_image)
        layer = pushed_image.image.layers[0]
        async with open_peer_link(daemon.peer_addr, "node-b", SECRET) as link:
            assert await link.request_piece(layer.digest, layer.size, 0) is not None
        for wrong in (None, b"x" * 32):
            with pytest.raises(PeerUnavailable):
                async with open_peer_link(daemon.peer_addr, "node-c", wrong) as link:
                    await link.request_piece(layer.digest, layer.size, 0)
        assert daemon.metric("p2pd_peer_bytes_uploaded_total") == min(layer.size, 1 << 20)
        assert daemon.proc.alive


def _garbage(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data
        except OSError:
            return b""


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@pytest.fixture
def lone_daemon(tmp_path: Path) -> Iterator[P2pd]:
    with P2pd.start(tmp_path / "p2pd", peer_port=0, node_id="node-a") as daemon:
        yield daemon


def test_garbage_on_the_peer_port_never_crashes_the_daemon(lone_daemon: P2pd) -> None:
    port = int(lone_daemon.peer_addr.rpartition(":")[2])
    hello = encode_frame(Hello(PROTOCOL_VERSION, "node-x", b"n" * 16, ()))
    rng = random.Random(7)
    cases = [
        b"\xff\xff\xff\xff" + b"x" * 100,                       # huge length prefix
        _frame(b"\x93\x01") [:3],                                # truncated header
        hello[:-3],                                              # truncated frame, EOF
        _frame(msgpack.packb([1, 99, "node-x", b"n" * 16, []])),  # wrong version
        _frame(msgpack.packb([1, PROTOCOL_VERSION, True, b"n" * 16, []])),  # bad type
        hello + _frame(msgpack.packb([77, 1, 2, 3])),            # unknown message
        hello + encode_frame(Ping(1)) + _frame(b"\xc1"),         # invalid msgpack
        hello + _frame(msgpack.packb([7, 1, "sha256:" + "0" * 64, 10, 5])),  # index ≥ count
        encode_frame(Ping(1)),                                   # before HELLO
        _frame(msgpack.packb([[[[[[[[[[1]]]]]]]]]])),            # nesting
        _frame(msgpack.packb({"a": 1})),                         # a map
    ]
    cases += [rng.randbytes(rng.randrange(1, 3000)) for _ in range(20)]
    for payload in cases:
        _garbage(port, payload)
    # A well-behaved peer is still served, and the daemon logged, not crashed.
    assert lone_daemon.proc.alive
    assert httpx.get(f"{lone_daemon.url}/healthz", trust_env=False).status_code == 200
    assert lone_daemon.metric("p2pd_peer_protocol_errors_total") >= 8
    assert "protocol error" in lone_daemon.log_text()
    assert "Traceback" not in lone_daemon.log_text()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda items: _frame(msgpack.packb(items)), st.lists(
        st.one_of(st.integers(-5, 2**64 - 1), st.text(max_size=20), st.binary(max_size=40),
                  st.booleans(), st.none()), max_size=7)),
), max_size=5))
def test_generated_frames_after_a_valid_hello_never_crash_the_daemon(
    lone_daemon: P2pd, frames: list[bytes],
) -> None:
    port = int(lone_daemon.peer_addr.rpartition(":")[2])
    hello = encode_frame(Hello(PROTOCOL_VERSION, "node-x", b"n" * 16, ()))
    _garbage(port, hello + b"".join(frames))
    assert lone_daemon.proc.alive


async def test_requests_for_pieces_beyond_the_blob_cannot_be_sent() -> None:
    from p2pd.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        Request(1, "sha256:" + "0" * 64, 10, 5)
    await trio.lowlevel.checkpoint()
