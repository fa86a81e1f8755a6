"""The peer wire protocol: messages, framing, strict decoding, the connection's state machine."""

from __future__ import annotations

import itertools
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pd.core.auth import Role
from p2pd.core.bitfield import (
    bitfield_length,
    bitfield_of_mask,
    check_bitfield,
    count_pieces,
    full_bitfield,
    has_piece,
    mask_of_bitfield,
    pack_bitfield,
    unpack_bitfield,
)
from p2pd.core.messages import (
    ERROR_VERSION,
    MAX_BLOB_SIZE,
    MAX_HOLDERS,
    MAX_UINT,
    Announce,
    AuthProof,
    Cancel,
    Error,
    Have,
    Hello,
    Holder,
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
    decode_message,
    encode_message,
    to_wire,
)
from p2pd.core.pieces import MAX_PIECE, PieceLayout
from p2pd.core.protocol import (
    CLOSED,
    MAX_CONTROL_FRAME,
    MAX_IN_FLIGHT,
    MAX_PIECE_FRAME,
    MAX_RECEIVE_BUFFER,
    NEED_DATA,
    Event,
    FrameReader,
    PeerConnection,
    State,
    encode_frame,
)
from p2pd.errors import LocalProtocolError, RemoteProtocolError

MiB = 1 << 20
DIGEST = "sha256:" + "ab" * 32
SIZE = 3 * MiB + 5  # four pieces; the last is 5 bytes

# --- strategies ------------------------------------------------------------------------

uints = st.integers(0, MAX_UINT)
digests = st.binary(min_size=32, max_size=32).map(lambda raw: f"sha256:{raw.hex()}")
node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
tokens = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,31}", fullmatch=True)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
hosts = st.one_of(
    st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,2}}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
)
addrs = st.builds("{}:{}".format, hosts, st.integers(1, 65535))
sizes = st.one_of(st.integers(0, 5 * MiB), st.integers(0, MAX_BLOB_SIZE))


@st.composite
def holdings(draw: st.DrawFn, count: int) -> tuple[bytes, bool]:
    if draw(st.booleans()):
        return full_bitfield(count), True
    length = bitfield_length(count)
    raw = bytearray(draw(st.binary(min_size=length, max_size=length)))
    if count % 8:
        raw[-1] &= (0xFF << (8 - count % 8)) & 0xFF
    return bytes(raw), False


@st.composite
def haves(draw: st.DrawFn, announce: bool = False) -> Have | Announce:
    size = draw(sizes)
    layout = PieceLayout.for_size(size)
    bits, complete = draw(holdings(layout.count))
    if announce:
        subset = draw(st.binary(min_size=len(bits), max_size=len(bits)))
        hashed = bytes(a & b for a, b in zip(bits, subset, strict=True))
        table = draw(st.binary(min_size=32, max_size=32)) * count_pieces(hashed)
        return Announce(draw(digests), size, layout.piece_size, bits, complete, draw(addrs),
                        hashed, table)
    return Have(draw(digests), size, layout.piece_size, bits, complete)


@st.composite
def piece_refs(draw: st.DrawFn, max_size: int = MAX_BLOB_SIZE) -> tuple[int, str, int, int]:
    size = draw(st.integers(1, max_size))
    index = draw(st.integers(0, PieceLayout.for_size(size).count - 1))
    return draw(uints), draw(digests), size, index


@st.composite
def pieces(draw: st.DrawFn) -> Piece:
    request_id, digest, size, index = draw(piece_refs(max_size=3 * MiB))
    length = PieceLayout.for_size(size).length(index)
    pattern = draw(st.binary(min_size=1, max_size=16))
    return Piece(request_id, digest, size, index, (pattern * (length // len(pattern) + 1))[:length])


@st.composite
def peers(draw: st.DrawFn) -> Peers:
    size = draw(sizes)
    count = PieceLayout.for_size(size).count
    ids = draw(st.lists(node_ids, max_size=6, unique=True))
    holders = tuple(Holder(i, draw(addrs), *draw(holdings(count))) for i in ids)
    table = draw(st.sampled_from([b"", b"\x07" * 32 * count]))
    return Peers(draw(uints), draw(digests), size, holders, draw(st.none() | node_ids), table)


@st.composite
def leases(draw: st.DrawFn, grant: bool = False) -> Lease | LeaseGrant:
    size = draw(st.integers(1, MAX_BLOB_SIZE))
    count = PieceLayout.for_size(size).count
    first, last = sorted(draw(st.lists(st.integers(0, count - 1), min_size=2, max_size=2)))
    if grant:
        return LeaseGrant(
            draw(uints), draw(digests), size, first, last, draw(st.booleans()), draw(node_ids)
        )
    return Lease(draw(uints), draw(digests), size, first, last)


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello, st.just(1), node_ids, st.binary(min_size=16, max_size=16),
        st.lists(tokens, max_size=16, unique=True).map(tuple),
    ),
    st.builds(AuthProof, st.binary(min_size=32, max_size=32)),
    st.builds(Error, tokens, st.text(max_size=1024)),
    st.builds(Ping, uints),
    st.builds(Pong, uints),
    haves(),
    haves(announce=True),
    piece_refs().map(lambda ref: Request(*ref)),
    pieces(),
    st.builds(lambda ref, why: Refuse(ref[0], ref[1], ref[2], ref[3], why), piece_refs(), tokens),
    st.builds(Cancel, uints),
    st.builds(Lookup, uints, digests, st.integers(0, MAX_BLOB_SIZE)),
    peers(),
    leases(),
    leases(grant=True),
    st.builds(Replicate, uints, digests, st.integers(0, MAX_BLOB_SIZE)),
    st.builds(Replicated, uints, digests, st.integers(0, MAX_BLOB_SIZE), tokens),
)


def frame(items: object) -> bytes:
    """A frame around any msgpack value (for hand-made, possibly invalid, messages)."""
    payload: bytes = msgpack.packb(items, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def drain(conn: PeerConnection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if event is CLOSED:
            break
    return events


def connect(a: PeerConnection, b: PeerConnection) -> None:
    """Shuttle bytes both ways until both sides are quiet."""
    for _ in range(4):
        for src, dst in ((a, b), (b, a)):
            if data := src.data_to_send():
                dst.receive_data(data)
            drain(dst)


def ready_pair() -> tuple[PeerConnection, PeerConnection]:
    a = PeerConnection("node-a", role=Role.INITIATOR, secret=None, rng=random.Random(1))
    b = PeerConnection("node-b", role=Role.RESPONDER, secret=None, rng=random.Random(2))
    connect(a, b)
    assert a.state is b.state is State.READY
    return a, b


# --- messages and framing --------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_messages_round_trip(message: Message) -> None:
    assert decode_message(encode_message(message)) == message
    framed = encode_frame(message)
    assert framed[4:] == encode_message(message)  # PIECE's one-copy path included
    assert int.from_bytes(framed[:4], "big") == len(framed) - 4
    assert len(framed) - 4 <= (MAX_PIECE_FRAME if isinstance(message, Piece) else MAX_CONTROL_FRAME)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=50)
@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 1 << 30), max_size=30))
def test_a_stream_split_anywhere_decodes_to_the_same_messages(
    sent: list[Message], points: list[int]
) -> None:
    stream = b"".join(encode_frame(m) for m in sent)
    reader = FrameReader()
    received = []
    for chunk in split(stream, points):
        reader.feed(chunk)
        while (message := reader.next_message()) is not None:
            received.append(message)
    assert received == sent
    assert reader.buffered == 0


def test_one_byte_feeds() -> None:
    sent: list[Message] = [Ping(7), Piece(0, DIGEST, SIZE, 3, b"12345"), Error("bye", "done")]
    stream = b"".join(encode_frame(m) for m in sent)
    reader = FrameReader()
    received = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        if (message := reader.next_message()) is not None:
            received.append(message)
    assert received == sent


def test_missing_counts_the_bytes_the_next_message_still_needs() -> None:
    sent: list[Message] = [Error("bye", "z" * 1000), Ping(7)]
    stream = b"".join(encode_frame(m) for m in sent)
    first = len(encode_frame(sent[0]))
    reader = FrameReader()
    assert reader.missing == 4  # the length prefix
    reader.feed(stream[:2])
    assert reader.missing == 2
    for fed in (4, 1000, first - 1):
        reader.feed(stream[reader.buffered:fed])
        assert reader.missing == first - fed  # what the frame's length says is left
        assert reader.next_message() is None
    reader.feed(stream[first - 1:first + 2])
    assert reader.missing == 0 and reader.next_message() == sent[0]
    assert reader.missing == 2  # the next prefix is half in
    reader.feed(stream[first + 2:])
    assert reader.missing == 0 and reader.next_message() == sent[1]


def test_the_largest_messages_fit_their_frames() -> None:
    size = MAX_BLOB_SIZE
    count = PieceLayout.for_size(size).count
    longest_host = ".".join(["h" * 63] * 3 + ["h" * 61])  # 253 characters
    holders = tuple(
        Holder(f"{i:03d}" + "n" * 125, f"{longest_host}:65535", full_bitfield(count), True)
        for i in range(MAX_HOLDERS)
    )
    biggest = Peers(MAX_UINT, DIGEST, size, holders, "f" * 128, b"\xff" * 32 * count)
    assert len(encode_frame(biggest)) - 4 <= MAX_CONTROL_FRAME
    assert decode_message(encode_message(biggest)) == biggest
    assert len(encode_frame(Error("x", "\U0001f600" * 1024))) - 4 <= MAX_CONTROL_FRAME
    piece = Piece(MAX_UINT, DIGEST, size, 0, bytes(MAX_PIECE))
    framed = encode_frame(piece)
    assert len(framed) - 4 <= MAX_PIECE_FRAME
    reader = FrameReader()
    reader.feed(framed)
    assert reader.next_message() == piece


@given(st.sets(st.integers(0, 99)), st.integers(100, 200))
def test_bitfields_round_trip(indices: set[int], count: int) -> None:
    bits = pack_bitfield(indices, count)
    assert len(bits) == bitfield_length(count)
    assert unpack_bitfield(bits, count) == indices
    assert count_pieces(bits) == len(indices)
    assert all(has_piece(bits, i) == (i in indices) for i in range(-1, count + 9))
    assert unpack_bitfield(full_bitfield(count), count) == set(range(count))


@given(st.sets(st.integers(0, 640)), st.integers(0, 40))
def test_bitfields_from_masks(indices: set[int], extra: int) -> None:
    count = max(indices, default=0) + 1 + extra
    mask = sum(1 << i for i in indices)
    assert bitfield_of_mask(mask, count) == pack_bitfield(indices, count)
    assert mask_of_bitfield(pack_bitfield(indices, count), count) == mask
    with pytest.raises(ValueError, match="past piece"):
        bitfield_of_mask(mask | 1 << count, count)
    with pytest.raises(ValueError):
        mask_of_bitfield(pack_bitfield(indices, count) + b"\0", count)


def test_malformed_bitfields() -> None:
    check_bitfield(b"\xe0", 3)
    with pytest.raises(ValueError, match="past the last piece"):
        check_bitfield(b"\xf0", 3)
    with pytest.raises(ValueError, match="expected 1"):
        check_bitfield(b"\xe0\x00", 3)
    with pytest.raises(ValueError):
        pack_bitfield([3], 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Ping(True), lambda: Ping(-1), lambda: Ping(2**63), lambda: Ping(1.0),  # type: ignore[arg-type]
        lambda: Request(0, DIGEST, SIZE, 4), lambda: Request(0, "sha256:AB", SIZE, 0),
        lambda: Request(0, DIGEST, MAX_BLOB_SIZE + 1, 0),
        lambda: Piece(0, DIGEST, SIZE, 3, b"1234"), lambda: Piece(0, DIGEST, SIZE, 0, b"x"),
        lambda: Have(DIGEST, SIZE, 2 * MiB, b"\xf0", False),
        lambda: Have(DIGEST, SIZE, MiB, b"\xe0", True),
        lambda: Have(DIGEST, SIZE, MiB, b"\xf8", False),
        lambda: Have(DIGEST, SIZE, MiB, bytearray(b"\xf0"), False),  # type: ignore[arg-type]
        lambda: Hello(1, "node a", bytes(16)), lambda: Hello(1, "a", bytes(15)),
        lambda: Hello(1, "a", bytes(16), ("x", "x")),
        lambda: Hello(1, "a", bytes(16), ["x"]),  # type: ignore[arg-type]
        lambda: Hello(1, "n" * 129, bytes(16)),
        lambda: Error("Bad", ""), lambda: Error("x", "m" * 1025),
        lambda: Lease(0, DIGEST, SIZE, 2, 1), lambda: Refuse(0, DIGEST, SIZE, 0, ""),
        lambda: Announce(DIGEST, 0, MiB, b"", True, "host", b"", b""),
        lambda: Announce(DIGEST, 0, MiB, b"", True, "host:0", b"", b""),
        lambda: Announce(DIGEST, 0, MiB, b"", True, "[::1%eth0]:80", b"", b""),
        lambda: Announce(DIGEST, 0, MiB, b"", True, "[zz::1]:80", b"", b""),
        lambda: Announce(DIGEST, 0, MiB, b"", True, "-bad-:80", b"", b""),
        lambda: Peers(0, DIGEST, 0, (Holder("a", "h:1", b"", True),) * 2, None, b""),
        lambda: Peers(0, DIGEST, SIZE, (Holder("a", "h:1", b"", True),), None, b""),
    ],
)
def test_invalid_messages_cannot_be_built(make: object) -> None:
    with pytest.raises(LocalProtocolError):
        make()  # type: ignore[operator]


# --- strict decoding on a live connection ----------------------------------------------

REQ = [Request.TAG, 1, DIGEST, SIZE]
DEEP = (5002).to_bytes(4, "big") + b"\x92\x04" + b"\x91" * 5000  # arrays 5000 deep
HAVE = [Have.TAG, DIGEST, SIZE, MiB]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff\xff", "exceeds"),
        ((MAX_PIECE_FRAME + 1).to_bytes(4, "big"), "exceeds"),
        ((MAX_CONTROL_FRAME + 1).to_bytes(4, "big") + bytes([0x92, Ping.TAG]), "not a PIECE"),
        (frame([99]), "unknown message type"),
        (frame(["ping"]), "unknown message type"),
        (frame([Ping.TAG, True]), "token must be an int"),
        (frame([Ping.TAG, 1.0]), "token must be an int"),
        (frame([Ping.TAG, -1]), "out of range"),
        (frame([Ping.TAG, 2**64 - 1]), "out of range"),
        (frame([Ping.TAG]), "has 0 fields"),
        (frame([Ping.TAG, 1, 2]), "has 2 fields"),
        (frame([*REQ, -1]), "out of range"),
        (frame([*REQ, 4]), "not below"),
        (frame([*REQ[:3], 0, 0]), "not below"),
        (frame([*HAVE, b"\xf0\x00", False]), "expected 1"),
        (frame([*HAVE, b"\xf8", False]), "past the last piece"),
        (frame([*HAVE, b"\xe0", True]), "every piece"),
        (frame([Have.TAG, DIGEST, SIZE, 2 * MiB, b"\xf0", False]), "piece_size"),
        (frame([Have.TAG, "sha256:AB", SIZE, MiB, b"\xf0", False]), "64 lowercase"),
        (frame([Piece.TAG, 1, DIGEST, SIZE, 3, b"1234"]), "data has another length"),
        (frame([Piece.TAG, 1, DIGEST, SIZE, 3, "12345"]), "data must be bytes"),
        (frame([Error.TAG, "x", "m" * 1025]), "longer|length"),
        (frame([Error.TAG, "x" * 33, ""]), "length"),
        (frame([Hello.TAG, 1, "n" * 129, bytes(16), []]), "length"),
        (frame([Cancel.TAG, msgpack.ExtType(5, b"x")]), "max_ext_len"),
        (frame([Cancel.TAG, msgpack.ExtType(5, b"")]), "extension"),
        (frame([Cancel.TAG, msgpack.Timestamp(0)]), "max_ext_len"),
        (frame({"type": Ping.TAG}), "max_map_len|maps"),
        (frame([Cancel.TAG, {}]), "maps"),
        (b"\x00\x00\x00\x05\x92\x04\x81\x01\x02", "max_map_len|map key"),
        (frame([Cancel.TAG, [[[[1]]]]]), "must be an int"),
        (frame([Cancel.TAG, [[]] * 64, [[]] * 64]), "too many arrays"),
        (DEEP, "malformed"),
        (b"\x00\x00\x00\x04\x92\x04\x01\x00", "malformed"),
        (b"\x00\x00\x00\x00", "malformed"),
        (b"\x00\x00\x00\x03\x92\x04\xc1", "malformed"),
        (b"\x00\x00\x00\x05\x92\x03\xa1\xff\xc0", "malformed"),
        (frame([Peers.TAG, 1, DIGEST, 0, [["a", "h:1", b"", True]] * 65, None, b""]),
         "max_array_len"),
        (frame([Peers.TAG, 1, DIGEST, 0, [["a", "h:1", b"", True]] * 2, None, b""]), "repeat"),
        (frame([Peers.TAG, 1, DIGEST, 0, [["a", "h:1", b""]], None, b""]), "holder must be"),
        (frame([Hello.TAG, 1, "node-b", bytes(16), []]), "duplicate Hello"),
        (frame([AuthProof.TAG, bytes(32)]), "no cluster secret"),
        (frame([Piece.TAG, 1, DIGEST, SIZE, 3, b"12345"]), "answers no request"),
    ],
)
def test_violations_after_the_handshake_are_remote_errors(data: bytes, reason: str) -> None:
    a, _ = ready_pair()
    a.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=reason):
        a.next_event()
    assert a.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="connection failed"):
        a.next_event()


def test_a_lying_length_is_refused_before_the_frame_is_buffered() -> None:
    a, _ = ready_pair()
    a.receive_data((MAX_CONTROL_FRAME + 1).to_bytes(4, "big") + bytes([0x96]))
    assert a.next_event() is NEED_DATA  # could still be a PIECE
    a.receive_data(bytes([Ping.TAG]))
    with pytest.raises(RemoteProtocolError, match="not a PIECE"):
        a.next_event()


def test_truncated_frame_then_eof() -> None:
    a, _ = ready_pair()
    a.receive_data(frame([Ping.TAG, 1])[:-1])
    assert a.next_event() is NEED_DATA
    a.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        a.next_event()


@pytest.mark.parametrize(
    "hello", [[Hello.TAG, 2, "node-b", bytes(16), []], [Hello.TAG, 7, "future", "shape"]]
)
def test_unknown_versions_are_named(hello: list[object]) -> None:
    a = PeerConnection("node-a", role=Role.INITIATOR, secret=None, rng=random.Random(1))
    a.receive_data(frame(hello))
    with pytest.raises(RemoteProtocolError, match="unsupported protocol version") as info:
        a.next_event()
    assert info.value.code == ERROR_VERSION


def test_messages_before_hello_are_refused() -> None:
    a = PeerConnection("node-a", role=Role.INITIATOR, secret=None, rng=random.Random(1))
    a.receive_data(frame([Ping.TAG, 1]))
    with pytest.raises(RemoteProtocolError, match="expected Hello first"):
        a.next_event()


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=40),
    st.binary(max_size=40), st.sampled_from([DIGEST, "node-b", "h:1", SIZE, 0, 1, b"\xf0"]),
)
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b: len(b).to_bytes(4, "big") + b, st.binary(max_size=300)),
        st.builds(lambda t, v: frame([t, *v]), st.integers(0, 16), st.lists(_values, max_size=8)),
    ),
    st.lists(st.integers(0, 400), max_size=5),
    st.booleans(),
)
def test_garbage_gives_need_data_or_a_remote_error(
    data: bytes, points: list[int], eof: bool
) -> None:
    a, _ = ready_pair()
    try:
        for chunk in [*split(data, points), *([b""] if eof else [])]:
            a.receive_data(chunk)
            drain(a)
    except RemoteProtocolError:
        assert a.state is State.ERROR


# --- the state machine and the request flow -------------------------------------------


def test_requests_and_answers_flow() -> None:
    a, b = ready_pair()
    b.receive_data(a.send(Request(1, DIGEST, SIZE, 3)) + a.send(Lookup(2, DIGEST, SIZE)))
    assert drain(b) == [Request(1, DIGEST, SIZE, 3), Lookup(2, DIGEST, SIZE)]
    assert set(a.in_flight) == set(b.peer_in_flight) == {1, 2}
    answers = b.send(Piece(1, DIGEST, SIZE, 3, b"12345"))
    answers += b.send(Peers(2, DIGEST, SIZE, (), None, b""))
    a.receive_data(answers)
    assert [type(e) for e in drain(a)] == [Piece, Peers]
    assert not a.in_flight and not b.peer_in_flight
    stats = a.statistics()
    assert (stats.messages_sent, stats.messages_received) == (3, 3)
    assert stats.bytes_received == b.statistics().bytes_sent


def test_cancel_is_answered_or_dropped_when_it_crosses_the_answer() -> None:
    a, b = ready_pair()
    b.receive_data(a.send(Request(1, DIGEST, SIZE, 0)) + a.send(Request(2, DIGEST, SIZE, 3)))
    drain(b)
    piece = b.send(Piece(2, DIGEST, SIZE, 3, b"12345"))
    b.receive_data(a.send(Cancel(1)) + a.send(Cancel(2)))  # Cancel(2) crosses the piece
    assert drain(b) == [Cancel(1)]
    a.receive_data(piece + b.send(Refuse(1, DIGEST, SIZE, 0, "cancelled")))
    assert [type(e) for e in drain(a)] == [Piece, Refuse]


@pytest.mark.parametrize(
    ("asked", "answer"),
    [
        (Request(1, DIGEST, SIZE, 0), Piece(1, DIGEST, SIZE, 3, b"12345")),
        (Request(1, DIGEST, SIZE, 0), Peers(1, DIGEST, SIZE, (), None, b"")),
        (Lookup(1, DIGEST, SIZE), Peers(1, DIGEST, SIZE + 1, (), None, b"")),
        (Lease(1, DIGEST, SIZE, 1, 2), LeaseGrant(1, DIGEST, SIZE, 0, 2, False, "node-c")),
        (Lease(1, DIGEST, SIZE, 1, 2), LeaseGrant(1, DIGEST, SIZE, 1, 2, True, "node-c")),
        (Lookup(1, DIGEST, SIZE), Cancel(1)),
        (Replicate(1, DIGEST, SIZE), Peers(1, DIGEST, SIZE, (), None, b"")),
        (Lookup(1, DIGEST, SIZE), Replicated(1, DIGEST, SIZE, "held")),
        (Replicate(1, DIGEST, SIZE), Replicated(1, DIGEST, SIZE + 1, "held")),
    ],
)
def test_mismatched_answers_are_refused_both_ways(asked: Message, answer: Message) -> None:
    a, b = ready_pair()
    b.receive_data(a.send(asked))
    drain(b)
    with pytest.raises(LocalProtocolError):
        b.send(answer)
    b2, a2 = ready_pair()  # the same, with b2 asking and a2 lying
    a2.receive_data(b2.send(asked))
    drain(a2)
    if isinstance(answer, Cancel):
        return  # a Cancel of a non-piece request is checked on the sender's side above
    b2.receive_data(encode_frame(answer))
    with pytest.raises(RemoteProtocolError, match="answers no request"):
        drain(b2)


def test_a_lease_grant_names_the_requester() -> None:
    a, b = ready_pair()
    b.receive_data(a.send(Lease(1, DIGEST, SIZE, 0, 3)))
    drain(b)
    a.receive_data(b.send(LeaseGrant(1, DIGEST, SIZE, 0, 1, True, "node-a")))
    assert drain(a) == [LeaseGrant(1, DIGEST, SIZE, 0, 1, True, "node-a")]


def test_request_ids_and_in_flight_limits() -> None:
    a, b = ready_pair()
    b.receive_data(a.send(Request(1, DIGEST, SIZE, 0)))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        a.send(Request(1, DIGEST, SIZE, 1))
    b.receive_data(frame([*REQ, 1]))
    drain_error = pytest.raises(RemoteProtocolError, match="already in flight")
    with drain_error:
        drain(b)
    a, b = ready_pair()
    for i in range(MAX_IN_FLIGHT):
        a.send(Lookup(i, DIGEST, SIZE))
        b.receive_data(frame([Lookup.TAG, i, DIGEST, SIZE]))
    with pytest.raises(LocalProtocolError, match="requests in flight"):
        a.send(Lookup(MAX_IN_FLIGHT, DIGEST, SIZE))
    b.receive_data(frame([Lookup.TAG, MAX_IN_FLIGHT, DIGEST, SIZE]))
    with pytest.raises(RemoteProtocolError, match="requests in flight"):
        drain(b)


def test_local_misuse() -> None:
    a = PeerConnection("node-a", role=Role.INITIATOR, secret=None, rng=random.Random(1))
    with pytest.raises(LocalProtocolError, match="in state AWAIT_HELLO"):
        a.send(Request(1, DIGEST, SIZE, 0))
    for own in (a.our_hello, AuthProof(bytes(32))):
        with pytest.raises(LocalProtocolError, match="itself"):
            a.send(own)
    with pytest.raises(LocalProtocolError, match="Cancel 5"):
        ready_pair()[0].send(Cancel(5))
    a.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        a.receive_data(b"x")
    b = PeerConnection("node-b", role=Role.RESPONDER, secret=None, rng=random.Random(2))
    b.receive_data(bytes(MAX_RECEIVE_BUFFER))
    with pytest.raises(LocalProtocolError, match="receive buffer full"):
        b.receive_data(b"x")
    with pytest.raises(ValueError, match="at least 16"):
        PeerConnection("node-c", role=Role.INITIATOR, secret=b"short", rng=random.Random(3))


def test_error_closes_both_sides() -> None:
    a, b = ready_pair()
    a.receive_data(b.send(Error("shutdown", "node draining")) + frame([Ping.TAG, 1]))
    assert drain(a) == [Error("shutdown", "node draining"), CLOSED]
    assert a.state is b.state is State.CLOSED
    assert a.next_event() is CLOSED
    for conn in (a, b):
        with pytest.raises(LocalProtocolError, match="in state CLOSED"):
            conn.send(Ping(1))


def test_after_a_remote_error_one_error_may_be_sent() -> None:
    a, _ = ready_pair()
    a.receive_data(frame([99]))
    with pytest.raises(RemoteProtocolError) as info:
        a.next_event()
    assert a.send(Error(info.value.code, info.value.message))
    with pytest.raises(LocalProtocolError):
        a.send(Error("again", ""))


def test_eof_between_frames_closes() -> None:
    a, b = ready_pair()
    a.receive_data(b.send(Ping(3)))
    a.receive_data(b"")
    assert drain(a) == [Ping(3), CLOSED]


def test_error_before_hello_is_accepted() -> None:
    a = PeerConnection("node-a", role=Role.INITIATOR, secret=None, rng=random.Random(1))
    a.receive_data(frame([Error.TAG, "overloaded", "try later"]))
    assert drain(a) == [Error("overloaded", "try later"), CLOSED]
    assert a.state is State.CLOSED


def _ask(i: int) -> Message:
    asks: list[Message] = [
        Lookup(i, DIGEST, SIZE), Request(i, DIGEST, SIZE, 3), Lease(i, DIGEST, SIZE, 0, 3)
    ]
    return asks[i % 3]


def _reply(i: int, step: str) -> Message:
    """What node-b sends at step ``i``: an answer to request ``i`` or a one-way message."""
    if step == "ping":
        return Ping(i)
    if step == "have":
        return Have(DIGEST, SIZE, MiB, b"\xa0", False)
    if i % 3 == 0:
        return Peers(i, DIGEST, SIZE, (Holder("node-c", "10.0.0.3:5000", b"\xf0", True),), None,
                     b"")
    if i % 3 == 2:
        return LeaseGrant(i, DIGEST, SIZE, 0, 1, step == "answer", "node-a")
    if step == "answer":
        return Piece(i, DIGEST, SIZE, 3, b"12345")
    return Refuse(i, DIGEST, SIZE, 3, "busy")


@settings(max_examples=40)
@given(
    st.lists(st.sampled_from(["answer", "refuse", "ping", "have"]), max_size=12),
    st.lists(st.integers(0, 1 << 20), max_size=20),
)
def test_a_connection_gives_the_same_events_however_the_stream_is_split(
    script: list[str], points: list[int]
) -> None:
    def scenario(feed: list[bytes] | None) -> tuple[list[Event], bytes]:
        a = PeerConnection("node-a", role=Role.INITIATOR, secret=bytes(16), rng=random.Random(1))
        b = PeerConnection("node-b", role=Role.RESPONDER, secret=bytes(16), rng=random.Random(2))
        b.receive_data(a.data_to_send())
        drain(b)
        a.receive_data(b.data_to_send())
        drain(a)
        b.receive_data(a.data_to_send())
        drain(b)
        for i in range(len(script)):
            b.receive_data(a.send(_ask(i)))
            drain(b)
        stream = b"".join(b.send(_reply(i, step)) for i, step in enumerate(script))
        events: list[Event] = []
        for chunk in feed if feed is not None else ([stream] if stream else []):
            a.receive_data(chunk)
            events.extend(drain(a))
        return events, stream

    whole, stream = scenario(None)
    assert whole == [_reply(i, step) for i, step in enumerate(script)]
    assert scenario(split(stream, points))[0] == whole


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_a_valid_message_with_one_field_replaced_is_accepted_or_a_remote_error(
    message: Message, data: st.DataObject
) -> None:
    items = to_wire(message)
    position = data.draw(st.integers(0, len(items) - 1))
    items[position] = data.draw(_values)
    a, _ = ready_pair()
    a.receive_data(frame(items))
    try:
        drain(a)
    except RemoteProtocolError:
        assert a.state is State.ERROR


def test_piece_tables_on_the_wire_must_match_the_pieces() -> None:
    layout = PieceLayout.for_size(SIZE)
    bits = full_bitfield(layout.count)
    good = Announce(DIGEST, SIZE, layout.piece_size, bits, True, "h:1", bits,
                    b"\x01" * 32 * layout.count)
    assert decode_message(encode_message(good)) == good
    with pytest.raises(LocalProtocolError, match="one sha256 per piece hashed"):
        Announce(DIGEST, SIZE, layout.piece_size, bits, True, "h:1", bits, b"\x01" * 31)
    first = pack_bitfield([0], layout.count)
    assert decode_message(encode_message(Announce(
        DIGEST, SIZE, layout.piece_size, bits, True, "h:1", first, b"\x01" * 32))).hashed == first
    partial = pack_bitfield([1], layout.count)
    with pytest.raises(LocalProtocolError, match="hashed names a piece the bitfield does not"):
        Announce(DIGEST, SIZE, layout.piece_size, partial, False, "h:1", first, b"\x01" * 32)
    with pytest.raises(LocalProtocolError, match="empty or hold"):
        Peers(1, DIGEST, SIZE, (), None, b"\x01" * 32)


def test_a_replicate_is_answered_once_by_replicated() -> None:
    a, b = ready_pair()
    b.receive_data(a.send(Replicate(7, DIGEST, SIZE)))
    assert drain(b) == [Replicate(7, DIGEST, SIZE)]
    assert b.peer_in_flight == {7: Replicate(7, DIGEST, SIZE)}
    a.receive_data(b.send(Replicated(7, DIGEST, SIZE, "fetched")))
    assert drain(a) == [Replicated(7, DIGEST, SIZE, "fetched")]
    assert not a.in_flight and not b.peer_in_flight
    with pytest.raises(LocalProtocolError, match="answers no request"):
        b.send(Replicated(7, DIGEST, SIZE, "fetched"))
