"""Hostile or broken clients on the mirror port never take the daemon down."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import httpx
import pytest

from p2pd.lab.daemon import P2pd

pytestmark = pytest.mark.e2e


def _send(port: int, payload: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while read and (chunk := sock.recv(65536)):
                data += chunk
            return data
        except OSError:
            return b""


def test_garbage_on_the_mirror_port_gets_an_error_and_the_daemon_lives(tmp_path: Path) -> None:
    rng = random.Random(1234)
    with P2pd.start(tmp_path / "p2pd") as daemon:
        cases = [
            b"\x00\xff" * 100 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 200_000 + b"\r\n\r\n",  # huge header
            b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
            b"GET /v2/a/blobs/sha256:" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: -5\r\n\r\n",
            b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /v2/a/blobs/sha256:" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET " + b"/v2/" + b"a/" * 3000 + b"manifests/x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v2/a/manifests/%00%ff HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v2/a/blobs/sha256:" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
            b"Range: bytes=" + b"9" * 2000 + b"-\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\n",  # truncated, then EOF
        ]
        cases += [rng.randbytes(rng.randrange(1, 4000)) for _ in range(30)]
        for payload in cases:
            answer = _send(daemon.port, payload)
            if answer:
                assert answer.startswith(b"HTTP/1.1 "), answer[:100]
                status = int(answer.split()[1])
                assert 400 <= status < 600
        # Connections opened and dropped at once, and one left idle, cost nothing.
        idle = socket.create_connection(("127.0.0.1", daemon.port))
        for _ in range(50):
            socket.create_connection(("127.0.0.1", daemon.port)).close()
        assert httpx.get(f"{daemon.url}/healthz", trust_env=False).status_code == 200
        idle.close()
        assert daemon.proc.alive
        assert "Traceback" not in daemon.log_text()
