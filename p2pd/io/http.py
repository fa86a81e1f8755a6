"""A small HTTP/1.1 server on trio and h11, made for streaming large bodies.

The handler gets a :class:`Request` and a :class:`ResponseWriter`. It sends the head,
then body chunks, then finishes. If the handler raises after the head went out, the
connection is closed before the declared ``Content-Length`` is reached: that is how a
response is aborted (a client that counts bytes sees a truncated body, never a wrong one).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_REQUEST_BODY = 1 << 20
RECEIVE_SIZE = 64 * 1024
IDLE_TIMEOUT = 120.0
HEAD_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request: method, target and header lines as received (names lower-cased)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    client: str

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or ``None``."""
        name = name.lower()
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    def header_lines(self, name: str) -> list[str]:
        """Every value of header ``name``, one per line received."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]


class ResponseAborted(Exception):
    """Raised to close a response early on purpose (the body is known to be bad)."""


class ResponseWriter:
    """Sends one response on a connection."""

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        self._conn = conn
        self._stream = stream
        self.status: int | None = None
        self.body_bytes = 0
        self.finished = False

    @property
    def started(self) -> bool:
        """Whether the status line went out (no other status can be sent now)."""
        return self.status is not None

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            await self._stream.send_all(data)

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Send the status line and headers."""
        self.status = status
        await self._send(h11.Response(status_code=status, headers=list(headers),
                                      reason=_reason(status)))

    async def write(self, data: bytes | memoryview) -> None:
        """Send part of the body."""
        if data:
            self.body_bytes += len(data)
            # The passthrough form hands the body back unjoined: no copy of large chunks.
            parts = self._conn.send_with_data_passthrough(h11.Data(data=data))  # type: ignore[arg-type]
            for part in parts or ():
                await self._stream.send_all(part)

    async def write_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of the file ``fd`` from ``offset`` with ``sendfile``.

        The bytes never pass through Python; h11 is told about them through its
        documented sendfile hook (a placeholder with a length in place of the data).
        """
        if count <= 0:
            return
        parts = self._conn.send_with_data_passthrough(
            h11.Data(data=_Placeholder(count))  # type: ignore[arg-type]
        )
        assert parts is not None and len(parts) == 1  # Content-Length framing: no headers
        sock = self._stream.socket  # type: ignore[attr-defined]
        out = sock.fileno()
        while count:
            try:
                sent = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"sendfile failed: {exc}") from exc
            if sent == 0:
                raise trio.BrokenResourceError("peer closed during sendfile")
            offset += sent
            count -= sent
            self.body_bytes += sent
        await trio.lowlevel.checkpoint()

    async def finish(self) -> None:
        """End the body."""
        await self._send(h11.EndOfMessage())
        self.finished = True

    async def send(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        *,
        length: int | None = None,
    ) -> None:
        """Send a whole response with a fixed body.

        ``length`` overrides ``Content-Length`` for an answer to ``HEAD``, which carries
        the length of the body a ``GET`` would get but no body.
        """
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body) if length is None else length)))
        await self.start(status, headers)
        await self.write(body)
        await self.finish()


class _Placeholder:
    """Stands in for body bytes that are sent with ``sendfile``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


Handler = Callable[[Request, ResponseWriter], Awaitable[None]]


async def serve_http(
    listeners: list[trio.SocketListener],
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on ``listeners`` (from ``trio.open_tcp_listeners``) until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started()

        async def on_connection(stream: trio.SocketStream) -> None:
            await _serve_connection(stream, handler)

        await trio.serve_listeners(on_connection, listeners, handler_nursery=nursery)


async def _receive_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event | type:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    try:
        peer = stream.socket.getpeername()
        client = f"{peer[0]}:{peer[1]}"
    except OSError:
        client = "?"
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    async with stream:
        try:
            while await _serve_one(conn, stream, handler, client):
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return
        except h11.RemoteProtocolError as exc:
            log.info("http: bad request from %s: %s", client, exc)
            await _refuse(conn, stream, exc.error_status_hint)


async def _serve_one(
    conn: h11.Connection, stream: trio.SocketStream, handler: Handler, client: str
) -> bool:
    """Serve one request; return whether the connection can carry another."""
    request = await _read_request(conn, stream, client)
    if request is None:
        return False
    writer = ResponseWriter(conn, stream)
    try:
        await handler(request, writer)
    except ResponseAborted as exc:
        log.warning("%s %s: response aborted: %s", request.method, request.target[:120], exc)
        return False
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        raise
    except Exception:
        # The connection is the fault boundary: one request's bug must not take the
        # daemon down. Answer 500 if nothing was sent yet, else cut the response short.
        log.exception("%s %s: internal error", request.method, request.target[:120])
        if not writer.started:
            await _refuse(conn, stream, 500, "INTERNAL_ERROR", "internal error in p2pd")
        return False
    return writer.finished and conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream, client: str
) -> Request | None:
    timeout = IDLE_TIMEOUT if conn.their_state is h11.IDLE else HEAD_TIMEOUT
    with trio.move_on_after(timeout):
        event = await _receive_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            return None
        # Drain (and bound) any request body; the pull API has none.
        received = 0
        while True:
            part = await _receive_event(conn, stream)
            if isinstance(part, h11.EndOfMessage):
                break
            if isinstance(part, h11.Data):
                received += len(part.data)
                if received > MAX_REQUEST_BODY:
                    raise h11.RemoteProtocolError("request body too large", 413)
            else:
                return None
        return Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("ascii", "replace"),
            headers=tuple(
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers
            ),
            client=client,
        )
    return None


async def _refuse(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    code: str = "UNSUPPORTED",
    message: str = "malformed HTTP request",
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    try:
        data = conn.send(h11.Response(
            status_code=status, reason=_reason(status),
            headers=[("Content-Type", "application/json"),
                     ("Content-Length", str(len(body))), ("Connection", "close")],
        ))
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
