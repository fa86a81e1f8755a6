"""The peer wire protocol as a sans-IO connection object, in the manner of h11.

How it works
------------
Frames: a 4-byte big-endian length, then that many bytes of msgpack, the array
``[TAG, field, ...]`` of a message from :mod:`p2pd.core.messages`. A frame holds at most
:data:`MAX_CONTROL_FRAME` bytes, except a ``PIECE``, which may hold up to
:data:`MAX_PIECE_FRAME`. A frame longer than the control limit must open with the two
bytes that open a ``PIECE`` array, so a lying length prefix is refused from the first
four (or six) bytes, before anything of the frame is buffered.

Handshake: each side sends ``HELLO`` first (the connection queues ours when it is made).
With a cluster secret each side then sends ``AUTH_PROOF`` (queued when the peer's HELLO
arrives; see :mod:`p2pd.core.auth`) and accepts nothing but ``AUTH_PROOF`` or ``ERROR``
until the peer's proof checks out. Our own messages may be sent once the state is
``READY``. Every input, received or sent, moves the state as :data:`_TRANSITIONS` says::

    AWAIT_HELLO --HELLO--> AWAIT_AUTH --AUTH_PROOF--> READY     with a cluster secret
    AWAIT_HELLO --HELLO--> READY                                without one
    live state --ERROR received, ERROR sent, or EOF--> CLOSED
    anything the table lacks, from the peer --> ERROR (raises RemoteProtocolError)

In ``ERROR`` every further :meth:`PeerConnection.next_event` raises, and one ``ERROR``
message may still be sent to tell the peer why.

Requests: every ``REQUEST``, ``LOOKUP``, ``LEASE`` and ``REPLICATE`` is answered exactly
once (by ``PIECE`` or ``REFUSE``, ``PEERS``, ``LEASE_GRANT``, ``REPLICATED``). The
connection tracks requests in flight both ways, so an answer to nothing, a repeated id,
a mismatched answer or more than :data:`MAX_IN_FLIGHT` open requests are protocol errors
whichever side commits them. A ``CANCEL`` that crosses the answer on the wire is dropped silently.

Driving it (the trio transport does exactly this)::

    conn = PeerConnection(node_id, role=Role.INITIATOR, secret=secret, rng=SystemRandom())
    write(conn.data_to_send())                  # our HELLO
    while (event := conn.next_event()) is not CLOSED:
        if event is NEED_DATA:
            conn.receive_data(read())           # b"" at EOF
            continue
        write(conn.data_to_send())              # our AUTH_PROOF once the peer's HELLO is in
        ...                                     # handle event; write(conn.send(answer))
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

import msgpack

from p2pd.core.auth import Authenticator, Role, hello_features
from p2pd.core.messages import (
    ERROR_AUTH,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    AuthProof,
    Cancel,
    Error,
    Hello,
    Lease,
    LeaseGrant,
    Lookup,
    Message,
    Peers,
    Piece,
    Refuse,
    Replicate,
    Replicated,
    Request,
    decode_message,
    encode_message,
)
from p2pd.core.pieces import MAX_PIECE
from p2pd.errors import LocalProtocolError, RemoteProtocolError

HEADER_SIZE: Final = 4
MAX_CONTROL_FRAME: Final = 256 << 10
MAX_PIECE_FRAME: Final = MAX_PIECE + (1 << 10)
MAX_FEED: Final = 1 << 20
"""Most bytes to pass to one :meth:`PeerConnection.receive_data` call."""
MAX_RECEIVE_BUFFER: Final = HEADER_SIZE + MAX_PIECE_FRAME + MAX_FEED
"""Receive buffer bound: one partial frame plus one feed (exceeding it is a caller bug)."""
MAX_IN_FLIGHT: Final = 256
"""Most requests one side may have unanswered on one connection."""

_PIECE_OPENING: Final = bytes([0x96, Piece.TAG])  # fixarray of TAG and Piece's 5 fields


def encode_frame(message: Message) -> bytes:
    """``message`` as one frame: length prefix and payload (a PIECE's data copied once)."""
    if not isinstance(message, Piece):
        payload = encode_message(message)
        if len(payload) > MAX_CONTROL_FRAME:
            raise LocalProtocolError(f"{type(message).__name__} does not fit in a control frame")
        return len(payload).to_bytes(HEADER_SIZE, "big") + payload
    fields = [message.request_id, message.digest, message.size, message.index]
    head: bytes = msgpack.packb(fields)
    size = len(message.data)
    if size < 1 << 8:
        bin_head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        bin_head = b"\xc5" + size.to_bytes(2, "big")
    else:
        bin_head = b"\xc6" + size.to_bytes(4, "big")
    length = len(_PIECE_OPENING) + len(head) - 1 + len(bin_head) + size
    prefix = length.to_bytes(HEADER_SIZE, "big") + _PIECE_OPENING
    return b"".join((prefix, head[1:], bin_head, message.data))


class FrameReader:
    """Cuts a received byte stream into frames and decodes them (no state machine)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buffer)

    @property
    def missing(self) -> int:
        """Bytes that must still arrive before the next message can be decoded (at least
        1 when none is complete; 0 if one is)."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(buffer)
        end = HEADER_SIZE + int.from_bytes(buffer[:HEADER_SIZE], "big")
        return max(0, end - len(buffer))

    def feed(self, data: bytes) -> None:
        """Append received bytes; raise :class:`LocalProtocolError` past the buffer bound."""
        if len(self._buffer) + len(data) > MAX_RECEIVE_BUFFER:
            raise LocalProtocolError(
                "receive buffer full: call next_event() until NEED_DATA between feeds "
                f"of at most {MAX_FEED} bytes"
            )
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` until more bytes arrive."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return None
        length = int.from_bytes(buffer[:HEADER_SIZE], "big")
        if length > MAX_PIECE_FRAME:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_PIECE_FRAME}")
        if length > MAX_CONTROL_FRAME:
            opening = buffer[HEADER_SIZE : HEADER_SIZE + len(_PIECE_OPENING)]
            if opening != _PIECE_OPENING[: len(opening)]:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds {MAX_CONTROL_FRAME} and is not a PIECE"
                )
        end = HEADER_SIZE + length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view, view[HEADER_SIZE:end] as payload:
            message = decode_message(payload)
        del buffer[:end]
        return message


class Sentinel(enum.Enum):
    """Non-message results of :meth:`PeerConnection.next_event`."""

    NEED_DATA = "need-data"
    CLOSED = "closed"


NEED_DATA: Final = Sentinel.NEED_DATA
"""No complete message yet: feed more bytes with :meth:`PeerConnection.receive_data`."""
CLOSED: Final = Sentinel.CLOSED
"""The connection is over: the peer closed or said ERROR, or we said ERROR."""

Event = Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]
"""What :meth:`PeerConnection.next_event` returns."""


class State(enum.Enum):
    """Where a :class:`PeerConnection` is in its life (what it expects from the peer)."""

    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    READY = "ready"
    CLOSED = "closed"
    ERROR = "error"


class Input(enum.Enum):
    """What moves the state: something received from the peer, or sent by us."""

    HELLO = "hello"
    AUTH_PROOF = "auth-proof"
    MESSAGE = "message"
    ERROR = "error"
    EOF = "eof"
    SEND_MESSAGE = "send-message"
    SEND_ERROR = "send-error"


_LIVE = (State.AWAIT_HELLO, State.AWAIT_AUTH, State.READY)
_TRANSITIONS: Final[Mapping[tuple[bool, State, Input], State]] = {
    # (cluster secret configured, state, input) -> next state; anything else is refused.
    (False, State.AWAIT_HELLO, Input.HELLO): State.READY,
    (True, State.AWAIT_HELLO, Input.HELLO): State.AWAIT_AUTH,
    (True, State.AWAIT_AUTH, Input.AUTH_PROOF): State.READY,
    **{(secret, State.READY, Input.MESSAGE): State.READY for secret in (False, True)},
    **{(secret, State.READY, Input.SEND_MESSAGE): State.READY for secret in (False, True)},
    **{
        (secret, state, ending): State.CLOSED
        for secret in (False, True)
        for state in _LIVE
        for ending in (Input.ERROR, Input.EOF, Input.SEND_ERROR)
    },
    # After the peer broke the protocol we may still tell it why (once).
    **{(secret, State.ERROR, Input.SEND_ERROR): State.ERROR for secret in (False, True)},
}

_Asking = Request | Lookup | Lease | Replicate
_Answer = Piece | Refuse | Peers | LeaseGrant | Replicated


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of a connection's counters."""

    state: State
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    bytes_buffered: int
    requests_in_flight: int
    peer_requests_in_flight: int


class PeerConnection:
    """One peer wire connection, without I/O (see the module docstring).

    ``role`` says which end opened the connection; ``secret`` is the cluster secret
    (``None`` for none, else at least 16 bytes); ``rng`` draws our nonce and should be a
    :class:`random.SystemRandom` outside tests and the simulation. ``features`` are
    extra HELLO feature names.
    """

    def __init__(
        self,
        our_node_id: str,
        *,
        role: Role,
        secret: bytes | None,
        rng: random.Random,
        features: tuple[str, ...] = (),
    ) -> None:
        nonce = rng.randbytes(NONCE_SIZE)
        features = hello_features(features, secret)
        self.role = role
        self.our_hello = Hello(PROTOCOL_VERSION, our_node_id, nonce, features)
        """The HELLO we send (queued at once: read it with :meth:`data_to_send`)."""
        self._auth = Authenticator(self.our_hello, role, secret)
        self._secret = secret is not None
        self._state = State.AWAIT_HELLO
        self._reader = FrameReader()
        self._outgoing = bytearray(encode_frame(self.our_hello))
        self._peer_hello: Hello | None = None
        self._asked: dict[int, _Asking] = {}
        self._asked_by_peer: dict[int, _Asking] = {}
        self._failure: RemoteProtocolError | None = None
        self._eof = False
        self._error_sent = False
        self._messages_sent = 1
        self._messages_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def peer_hello(self) -> Hello | None:
        """The peer's HELLO once received; its node id is authenticated only in READY."""
        return self._peer_hello

    @property
    def in_flight(self) -> Mapping[int, _Asking]:
        """Our requests not yet answered, by id (to retry elsewhere if the peer goes)."""
        return MappingProxyType(self._asked)

    @property
    def peer_in_flight(self) -> Mapping[int, _Asking]:
        """The peer's requests we have not yet answered, by id."""
        return MappingProxyType(self._asked_by_peer)

    def statistics(self) -> ConnectionStatistics:
        """The connection's counters."""
        return ConnectionStatistics(
            state=self._state,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            bytes_buffered=self._reader.buffered,
            requests_in_flight=len(self._asked),
            peer_requests_in_flight=len(self._asked_by_peer),
        )

    def data_to_send(self) -> bytes:
        """Bytes the connection produced by itself (our HELLO, our AUTH_PROOF); clears them.

        :meth:`send` returns them too, ahead of its own frame, so the order is kept.
        """
        data = bytes(self._outgoing)
        self._outgoing.clear()
        self._bytes_sent += len(data)
        return data

    def send(self, message: Message) -> bytes:
        """The bytes to write to send ``message``.

        Raises :class:`LocalProtocolError` if the protocol forbids it now: before the
        handshake completes, after the connection closed, for HELLO or AUTH_PROOF (the
        connection sends those itself), or for a request or answer that breaks the
        request flow. The connection is unchanged when it raises.
        """
        if isinstance(message, (Hello, AuthProof)):
            raise LocalProtocolError(f"the connection sends {type(message).__name__} itself")
        kind = Input.SEND_ERROR if isinstance(message, Error) else Input.SEND_MESSAGE
        target = _TRANSITIONS.get((self._secret, self._state, kind))
        if target is None or (kind is Input.SEND_ERROR and self._error_sent):
            raise LocalProtocolError(
                f"cannot send {type(message).__name__} in state {self._state.name}"
            )
        frame = encode_frame(message)
        if kind is Input.SEND_MESSAGE:
            assert self._peer_hello is not None  # READY
            problem = _record(message, self._asked, self._asked_by_peer, self._peer_hello.node_id)
            if problem is not None:
                raise LocalProtocolError(problem)
        self._error_sent = self._error_sent or kind is Input.SEND_ERROR
        self._state = target
        self._messages_sent += 1
        self._bytes_sent += len(frame)
        return self.data_to_send() + frame if self._outgoing else frame

    @property
    def bytes_missing(self) -> int:
        """Bytes still to arrive before :meth:`next_event` can return the next message
        (how much a reader may wait for before it wakes; see ``FrameReader.missing``)."""
        return self._reader.missing

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its end (EOF).

        Call :meth:`next_event` until it returns NEED_DATA before feeding more, and feed
        at most :data:`MAX_FEED` bytes at a time. Bytes after CLOSED or ERROR are dropped.
        """
        if self._state in (State.CLOSED, State.ERROR):
            return
        if self._eof and data:
            raise LocalProtocolError("data received after EOF")
        if not data:
            self._eof = True
            return
        self._reader.feed(data)
        self._bytes_received += len(data)

    def next_event(self) -> Event:
        """The next message from the peer, NEED_DATA, or CLOSED.

        Raises :class:`RemoteProtocolError` when the peer breaks the protocol; the
        connection is then in ERROR and every later call raises again.
        """
        if self._failure is not None:
            failure = self._failure
            raise RemoteProtocolError(f"connection failed: {failure.message}", code=failure.code)
        if self._state is State.CLOSED:
            return CLOSED
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._state = State.ERROR
            self._failure = exc
            raise

    def _next_event(self) -> Event:
        while True:
            message = self._reader.next_message()
            if message is None:
                if not self._eof:
                    return NEED_DATA
                if self._reader.buffered:
                    raise RemoteProtocolError("connection closed in the middle of a frame")
                self._state = State.CLOSED
                return CLOSED
            self._messages_received += 1
            if self._receive(message):
                return message

    def _receive(self, message: Message) -> bool:
        """Move the state for a received message; whether to hand it to the caller."""
        kind = _input_of(message)
        target = _TRANSITIONS.get((self._secret, self._state, kind))
        if target is None:
            raise self._refusal(kind, message)
        if isinstance(message, Hello):
            proof = self._auth.check_hello(message)
            self._peer_hello = message
            if proof is not None:
                self._outgoing += encode_frame(proof)
        elif isinstance(message, AuthProof):
            assert self._peer_hello is not None  # AWAIT_AUTH
            self._auth.check_proof(self._peer_hello, message)
        elif isinstance(message, Cancel) and message.request_id not in self._asked_by_peer:
            return False  # crossed our answer on the wire
        elif kind is Input.MESSAGE:
            grantee = self.our_hello.node_id
            problem = _record(message, self._asked_by_peer, self._asked, grantee)
            if problem is not None:
                raise RemoteProtocolError(problem)
        self._state = target
        return True

    def _refusal(self, kind: Input, message: Message) -> RemoteProtocolError:
        name = type(message).__name__
        if self._state is State.AWAIT_HELLO:
            return RemoteProtocolError(f"expected Hello first, got {name}")
        if kind is Input.HELLO or (kind is Input.AUTH_PROOF and self._secret):
            return RemoteProtocolError(f"duplicate {name}")
        if kind is Input.AUTH_PROOF:
            return RemoteProtocolError(
                "unexpected AuthProof: no cluster secret is configured here", code=ERROR_AUTH
            )
        return RemoteProtocolError(
            f"authentication required: expected AuthProof, got {name}", code=ERROR_AUTH
        )


def _input_of(message: Message) -> Input:
    if isinstance(message, Hello):
        return Input.HELLO
    if isinstance(message, AuthProof):
        return Input.AUTH_PROOF
    if isinstance(message, Error):
        return Input.ERROR
    return Input.MESSAGE


def _record(
    message: Message, mine: dict[int, _Asking], theirs: dict[int, _Asking], grantee: str
) -> str | None:
    """Track ``message`` against the requests in flight; why it breaks the flow, if it does.

    ``mine`` are the requests of the message's sender, ``theirs`` those of the other
    side; ``grantee`` is the node a LEASE_GRANT of the sender would go to. Nothing is
    recorded when a reason is returned.
    """
    if isinstance(message, (Request, Lookup, Lease, Replicate)):
        if message.request_id in mine:
            return f"request id {message.request_id} is already in flight"
        if len(mine) >= MAX_IN_FLIGHT:
            return f"more than {MAX_IN_FLIGHT} requests in flight"
        mine[message.request_id] = message
    elif isinstance(message, (Piece, Refuse, Peers, LeaseGrant, Replicated)):
        asked = theirs.get(message.request_id)
        if asked is None or not _answers(message, asked, grantee):
            name = type(message).__name__
            return f"{name} {message.request_id} answers no request in flight"
        del theirs[message.request_id]
    elif isinstance(message, Cancel) and not isinstance(mine.get(message.request_id), Request):
        return f"Cancel {message.request_id} names no piece request in flight"
    return None


def _answers(answer: _Answer, asked: _Asking, grantee: str) -> bool:
    """Whether ``answer`` is a valid answer to ``asked``."""
    if (answer.digest, answer.size) != (asked.digest, asked.size):
        return False
    if isinstance(answer, (Piece, Refuse)):
        return isinstance(asked, Request) and answer.index == asked.index
    if isinstance(answer, Peers):
        return isinstance(asked, Lookup)
    if isinstance(answer, Replicated):
        return isinstance(asked, Replicate)
    return (
        isinstance(asked, Lease)
        and asked.first_piece <= answer.first_piece
        and answer.last_piece <= asked.last_piece
        and (not answer.granted or answer.holder == grantee)
    )
