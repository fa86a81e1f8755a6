"""The peer port: the wire protocol of :mod:`p2pd.core.protocol` over trio TCP streams.

How it works: every connection, either way, is one :class:`PeerConnection` (sans-IO)
fed from a trio stream. The server side answers what peers ask: ``REQUEST`` with the
piece's bytes when this node holds it verified (a complete cached blob, or a piece of a
download in flight), else ``REFUSE``; ``PING`` with ``PONG``; coordinator queries with
what this node knows. A peer that breaks the protocol gets an ``ERROR`` and the
connection is closed; the error is logged, the daemon carries on. The client side,
:class:`PeerLink`, opens a connection, completes the handshake (and the cluster-secret
proof) and sends requests; a reader task routes each answer to its waiting request.
"""

from __future__ import annotations

import logging
import math
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pd.core.auth import Role
from p2pd.core.messages import (
    ERROR_PROTOCOL,
    REFUSE_BUSY,
    REFUSE_MISSING,
    REPLICATED_FAILED,
    REPLICATED_UNSUPPORTED,
    Announce,
    Error,
    Have,
    Lease,
    LeaseGrant,
    Lookup,
    Message,
    Peers,
    Piece,
    Ping,
    Pong,
    Refuse,
    Replicate,
    Replicated,
    Request,
)
from p2pd.core.pieces import piece_size_for
from p2pd.core.protocol import CLOSED, MAX_FEED, NEED_DATA, PeerConnection, Sentinel, State
from p2pd.core.tuning import BUSY_AFTER, MAX_UPLOADS, MAX_WAITING
from p2pd.errors import P2PError, ProtocolError, RemoteProtocolError
from p2pd.io.throttle import Throttle

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0
"""A piece the peer has not taken within this time ends the connection."""
IDLE_TIMEOUT = 300.0
MAX_PIPELINE = 32
"""Piece requests one connection may have waiting or being answered; more are refused as
busy at once."""

PieceSource = Callable[[str, int, int], Awaitable[bytes | None]]
"""``(digest, size, index) -> verified piece bytes, or None if this node lacks them``."""
Replicator = Callable[[str, int], Awaitable[str]]
"""``(digest, size) -> REPLICATED_* reason``, once the blob is held or given up on."""
Holdings = Callable[[str, int], "tuple[bytes, bool] | None"]
"""``(digest, size) -> (bitfield, complete)`` of the pieces served, or None if none."""
OnHave = Callable[[str, Have], None]
"""``(peer node id, HAVE)``: a peer told us which pieces of a blob it holds."""


class Coordinating(Protocol):
    """What answers the coordinator messages of the peer port (the swarm)."""

    def on_announce(self, peer_id: str, msg: Announce) -> None: ...
    def on_lookup(self, peer_id: str, msg: Lookup) -> Peers: ...
    def on_lease(self, peer_id: str, msg: Lease) -> LeaseGrant: ...


class PeerUnavailable(P2PError):
    """A peer could not be reached, refused us, or went away mid-request."""


@dataclass
class PeerServerStatistics:
    """Counters of the peer port."""

    connections: int = 0
    protocol_errors: int = 0
    pieces_served: int = 0
    bytes_served: int = 0
    refusals: int = 0


@dataclass
class PeerService:
    """What the peer port serves, and how it identifies itself."""

    node_id: str
    secret: bytes | None
    pieces: PieceSource
    rng: random.Random = field(default_factory=random.SystemRandom)
    stats: PeerServerStatistics = field(default_factory=PeerServerStatistics)
    on_bytes_uploaded: Callable[[int], None] = lambda n: None
    on_protocol_error: Callable[[], None] = lambda: None
    coordinator: Coordinating | None = None
    upload: Throttle = field(default_factory=lambda: Throttle(None))
    max_uploads: int = MAX_UPLOADS
    max_waiting: int = MAX_WAITING
    replicate: Replicator | None = None
    holdings: Holdings | None = None
    _slots: trio.Semaphore | None = None

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer peers on ``listeners`` until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        conn = PeerConnection(self.node_id, role=Role.RESPONDER, secret=self.secret,
                              rng=self.rng)
        peer = _peer_name(stream)
        send = _Sender(stream)
        async with stream:
            failure: BaseException | None = None
            # Piece requests are answered in tasks of their own, so a lookup or a lease
            # on the same connection is never stuck behind pieces being uploaded.
            async with trio.open_nursery() as uploads:
                try:
                    await send(conn.data_to_send())
                    await self._answer(conn, send, uploads)
                except (RemoteProtocolError, trio.BrokenResourceError,
                        trio.ClosedResourceError, OSError) as exc:
                    failure = exc
                uploads.cancel_scope.cancel()
            if isinstance(failure, RemoteProtocolError):
                self.stats.protocol_errors += 1
                self.on_protocol_error()
                log.warning("peer %s: protocol error: %s", peer, failure)
                await _send_error(conn, stream, failure.code, str(failure))
            elif failure is not None:
                log.debug("peer %s: connection lost: %s", peer, failure)

    async def _answer(self, conn: PeerConnection, send: _Sender,
                      uploads: trio.Nursery) -> None:
        timeout = HANDSHAKE_TIMEOUT
        while True:
            with trio.move_on_after(timeout) as idle:
                event = await _next_event(conn, send.stream)
            if idle.cancelled_caught:
                raise RemoteProtocolError("peer went silent")
            timeout = IDLE_TIMEOUT
            if event is CLOSED:
                return
            await send(conn.data_to_send())
            assert not isinstance(event, Sentinel)
            hello = conn.peer_hello
            if isinstance(event, Request):
                if send.uploads >= MAX_PIPELINE:  # answered at once: the stream stays bounded
                    self.stats.refusals += 1
                    await send(conn.send(_busy(event)))
                else:
                    send.uploads += 1
                    uploads.start_soon(self._upload, conn, send, event)
                continue
            if isinstance(event, Replicate):  # answered when the blob is in (a task)
                uploads.start_soon(self._replicate, conn, send, event)
                continue
            reply = await self._reply(hello.node_id if hello else "?", event)
            if reply is not None:
                await send(conn.send(reply))

    async def _upload(self, conn: PeerConnection, send: _Sender, request: Request) -> None:
        """Answer a piece request within the upload slots and the upload rate (a task of
        its own; a peer that stops reading ends the connection)."""
        try:
            await self._answer_request(conn, send, request)
        except RemoteProtocolError as exc:
            self.stats.protocol_errors += 1
            self.on_protocol_error()
            log.warning("peer %s: %s", _peer_name(send.stream), exc)
            await send.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the reading side sees it too
        finally:
            send.uploads -= 1

    async def _replicate(self, conn: PeerConnection, send: _Sender, ask: Replicate) -> None:
        reason = REPLICATED_UNSUPPORTED
        if self.replicate is not None:
            try:
                reason = await self.replicate(ask.digest, ask.size)
            except Exception:  # a preheat must never take the connection down
                log.exception("replicating %s failed unexpectedly", ask.digest[7:19])
                reason = REPLICATED_FAILED
        try:
            await send(conn.send(Replicated(ask.request_id, ask.digest, ask.size, reason)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the asker went away; the blob stays in the cache all the same

    async def _answer_request(
        self, conn: PeerConnection, send: _Sender, request: Request
    ) -> None:
        if self._slots is None:
            self._slots = trio.Semaphore(self.max_uploads)
        slots, slot = self._slots, False
        if slots.value or slots.statistics().tasks_waiting < self.max_waiting:
            with trio.move_on_after(BUSY_AFTER):  # only the wait for a slot may time out
                await slots.acquire()
                slot = True
        if not slot:
            self.stats.refusals += 1
            await self._tell(conn, send, request)
            await send(conn.send(_busy(request)))
            return
        try:
            reply = await self._piece(request)
            if isinstance(reply, Piece):  # paid before it goes: uploads run side by side
                await self.upload.moved(len(reply.data))
                await self._tell(conn, send, request)
            if not await send(conn.send(reply), timeout=SEND_TIMEOUT):
                # A peer that stops reading must not keep an upload slot forever.
                raise RemoteProtocolError("peer stopped reading a piece")
        finally:
            slots.release()

    async def _tell(self, conn: PeerConnection, send: _Sender, request: Request) -> None:
        """Send the asker a ``HAVE`` of the blob first if our pieces changed since we last
        told it: a peer we trade with learns our new pieces as they come, between its
        lookups."""
        held = self.holdings(request.digest, request.size) if self.holdings else None
        key = (request.digest, request.size)
        if held is None or send.told.get(key) == held[0]:
            return
        send.told[key] = held[0]
        await send(conn.send(Have(request.digest, request.size, piece_size_for(request.size),
                                  *held)))

    async def _piece(self, message: Request) -> Piece | Refuse:
        data = await self.pieces(message.digest, message.size, message.index)
        if data is None:
            self.stats.refusals += 1
            return Refuse(message.request_id, message.digest, message.size, message.index,
                          REFUSE_MISSING)
        self.stats.pieces_served += 1
        self.stats.bytes_served += len(data)
        self.on_bytes_uploaded(len(data))
        return Piece(message.request_id, message.digest, message.size, message.index, data)

    async def _reply(self, peer_id: str, message: Message) -> Message | None:
        if isinstance(message, Ping):
            return Pong(message.token)
        if self.coordinator is not None:
            if isinstance(message, Announce):
                self.coordinator.on_announce(peer_id, message)
                return None
            if isinstance(message, Lookup):
                return self.coordinator.on_lookup(peer_id, message)
            if isinstance(message, Lease):
                return self.coordinator.on_lease(peer_id, message)
        # Without a swarm nothing is coordinated here: empty answers keep the request
        # flow whole (every request is answered exactly once).
        if isinstance(message, Lookup):
            return Peers(message.request_id, message.digest, message.size, (), None, b"")
        if isinstance(message, Lease):
            return LeaseGrant(message.request_id, message.digest, message.size,
                              message.first_piece, message.last_piece, False, self.node_id)
        return None


RCVLOWAT_MAX = 256 * 1024
"""While a large frame (a piece) is arriving, the reader asks the kernel to wake it only
once this much of it, or all that is left of it if less, has arrived (``SO_RCVLOWAT``)."""
RCVLOWAT_MIN = 16 * 1024
"""Below this, the reader wakes for any byte (the default): not worth a system call."""


class _Wakeups:
    """How many bytes wake the reader of a peer link: what the frame being read still
    needs, up to :data:`RCVLOWAT_MAX` (``SO_RCVLOWAT``).

    Why: on a shaped link TCP delivers a piece frame one segment at a time, and every
    wakeup costs the reader a trip through trio's scheduler. Emulated daemons on 4 MiB/s
    links spent 16 % of a core each, most of it in that path (py-spy). The threshold never
    exceeds the rest of the frame, so the bytes the reader waits for are on their way.
    """

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream if isinstance(stream, trio.SocketStream) else None
        self._lowat = 1

    def expect(self, missing: int) -> None:
        """The next message needs ``missing`` more bytes."""
        lowat = min(missing, RCVLOWAT_MAX) if missing >= RCVLOWAT_MIN else 1
        if lowat == self._lowat or self._stream is None:
            return
        try:
            self._stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        except OSError:  # not supported here: wake for every byte, as before
            self._stream = None
            return
        self._lowat = lowat


async def _next_event(
    conn: PeerConnection, stream: trio.abc.ReceiveStream, throttle: Throttle | None = None,
    wakeups: _Wakeups | None = None,
) -> Message | Sentinel:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        if wakeups is not None:
            wakeups.expect(conn.bytes_missing)
        data = bytes(await stream.receive_some(MAX_FEED))
        conn.receive_data(data)
        if throttle is not None:
            await throttle.moved(len(data))


class _Sender:
    """Whole frames onto one connection's stream, one at a time (tasks share it)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.uploads = 0  # piece requests being answered on this connection
        self.told: dict[tuple[str, int], bytes] = {}  # the last HAVE sent, per blob
        self._lock = trio.Lock()

    async def __call__(self, data: bytes, *, timeout: float = math.inf) -> bool:
        """Send ``data``; False if the send itself (not the wait for the stream) took
        longer than ``timeout``."""
        if not data:
            return True
        async with self._lock:
            with trio.move_on_after(timeout) as sending:
                await self.stream.send_all(data)
        return not sending.cancelled_caught


def _busy(request: Request) -> Refuse:
    return Refuse(request.request_id, request.digest, request.size, request.index,
                  REFUSE_BUSY)


async def _send_error(
    conn: PeerConnection, stream: trio.abc.SendStream, code: str, message: str
) -> None:
    with trio.move_on_after(5):  # a peer that stopped reading gets no explanation
        try:
            await stream.send_all(conn.send(Error(code or ERROR_PROTOCOL, message[:1000])))
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


class PeerLink:
    """Our connection to one peer: send requests, await their answers."""

    def __init__(
        self, conn: PeerConnection, stream: trio.SocketStream, addr: str,
        download: Throttle | None = None, on_have: OnHave | None = None,
    ) -> None:
        self.addr = addr
        self._download = download
        self._on_have = on_have
        self._conn = conn
        self._stream = stream
        self._send_lock = trio.Lock()
        self._waiting: dict[int, trio.MemorySendChannel[Message]] = {}
        self._next_id = 1
        self._failure: BaseException | None = None
        self.closed = trio.Event()
        """Set once the connection is gone (the link cannot be used any more)."""

    @property
    def peer_id(self) -> str:
        """The peer's node id from its HELLO (authenticated when a secret is set)."""
        hello = self._conn.peer_hello
        return hello.node_id if hello is not None else "?"

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def request_piece(self, digest: str, size: int, index: int) -> bytes | None:
        """Piece ``index`` of ``digest`` as the peer sent it, or ``None`` if refused.

        The caller verifies the bytes against the piece table.
        """
        answer = await self.call(lambda rid: Request(rid, digest, size, index))
        if isinstance(answer, Piece):
            return answer.data
        return None

    async def send(self, message: Message) -> None:
        """Send a message that has no answer (``ANNOUNCE``, ``HAVE``)."""
        if self._failure is not None:
            raise PeerUnavailable(f"peer {self.addr}: {self._failure}")
        try:
            async with self._send_lock:
                await self._stream.send_all(self._frame(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"peer {self.addr}: {exc}") from exc

    async def call(self, make: Callable[[int], Message]) -> Message:
        """Send the request ``make(request_id)`` and wait for its answer."""
        if self._failure is not None:
            raise PeerUnavailable(f"peer {self.addr}: {self._failure}")
        request_id = self._new_id()
        send, receive = trio.open_memory_channel[Message](1)
        self._waiting[request_id] = send
        try:
            async with self._send_lock:
                await self._stream.send_all(self._frame(make(request_id)))
            async with receive:
                async for answer in receive:
                    return answer
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"peer {self.addr}: {exc}") from exc
        finally:
            self._waiting.pop(request_id, None)
        raise PeerUnavailable(f"peer {self.addr}: {self._failure or 'connection closed'}")

    def _frame(self, message: Message) -> bytes:
        """``message``'s bytes, or :class:`PeerUnavailable` if the connection has ended:
        the reader may have seen it close before it recorded why."""
        if self._conn.state in (State.CLOSED, State.ERROR):
            raise PeerUnavailable(f"peer {self.addr}: {self._failure or 'connection closed'}")
        return self._conn.send(message)

    async def _read(self) -> None:
        wakeups = _Wakeups(self._stream)
        try:
            while True:
                event = await _next_event(self._conn, self._stream, self._download, wakeups)
                if event is CLOSED:
                    self._failure = PeerUnavailable("closed")
                    break
                if isinstance(event, Error):
                    self._failure = PeerUnavailable(f"peer error {event.code}: {event.message}")
                    break
                if isinstance(event, Have):
                    if self._on_have is not None:
                        self._on_have(self.peer_id, event)
                    continue
                request_id = getattr(event, "request_id", None)
                waiter = self._waiting.pop(request_id, None) if request_id else None
                if waiter is not None:
                    try:
                        waiter.send_nowait(event)  # type: ignore[arg-type]
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the asker gave up (cancelled): nobody wants this answer
                    waiter.close()
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            log.warning("peer %s: %r", self.addr, exc)
            self._failure = exc
        finally:
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()
            self.closed.set()


@asynccontextmanager
async def open_peer_link(
    addr: str, node_id: str, secret: bytes | None, *, rng: random.Random | None = None,
    timeout: float = HANDSHAKE_TIMEOUT, download: Throttle | None = None,
    on_have: OnHave | None = None,
) -> AsyncIterator[PeerLink]:
    """Connect to the peer at ``addr`` (``HOST:PORT``) and complete the handshake.

    Raises :class:`PeerUnavailable` if it cannot be reached or refuses us (for example
    because we cannot prove the cluster secret).
    """
    host, _, port = addr.rpartition(":")
    conn = PeerConnection(node_id, role=Role.INITIATOR, secret=secret,
                          rng=rng or random.SystemRandom())
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            await stream.send_all(conn.data_to_send())
            while conn.state.name not in ("READY", "CLOSED", "ERROR"):
                event = await _next_event(conn, stream)
                await stream.send_all(conn.data_to_send())
                if isinstance(event, Error) or event is CLOSED:
                    await stream.aclose()
                    raise PeerUnavailable(f"peer {addr} refused us: "
                                          f"{getattr(event, 'message', 'closed')}")
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, RemoteProtocolError) as exc:
        # (a peer dying during the handshake resets the connection: BrokenResourceError)
        raise PeerUnavailable(f"peer {addr}: {exc}") from exc
    link = PeerLink(conn, stream, addr, download, on_have)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(link._read)
        try:
            yield link
        finally:
            nursery.cancel_scope.cancel()
