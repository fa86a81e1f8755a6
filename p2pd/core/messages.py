"""The messages of the peer wire protocol and their msgpack encoding.

Each message is a frozen dataclass with a type tag ``TAG``; its payload is the msgpack
array ``[TAG, field, field, ...]`` in declaration order (framing is in
:mod:`p2pd.core.protocol`). A field name means the same thing in every message, and
that meaning is checked when a message is made (see :func:`_check`):

    ===========================  ==============================================
    request_id, token, version   int in ``0 .. 2**63-1`` (``bool`` is no int)
    node_id, holder, fetcher     ``[A-Za-z0-9][A-Za-z0-9._-]*``, ≤ 128 chars
                                 (``fetcher`` may be ``None``)
    nonce, mac                   bytes of exactly 16 / 32
    features                     tuple of ≤ 16 distinct names (see ``code``)
    code, reason                 ``[a-z0-9][a-z0-9.-]*``, ≤ 32 chars
    message                      any text, ≤ 1024 chars
    digest                       ``sha256:<64 hex>``
    addr                         ``HOST:PORT``, ≤ 300 chars, port 1..65535
    size                         blob size in ``0 .. MAX_BLOB_SIZE``
    piece_size                   exactly ``piece_size_for(size)``
    bitfield, complete           exact-length bitfield, unused bits zero;
                                 ``complete`` requires every piece
    hashed                       a bitfield of pieces in ``bitfield`` (those
                                 whose hashes an ``ANNOUNCE`` carries)
    index, first/last_piece      piece indices below the count; first ≤ last
    data                         exactly the length of piece ``index``
    holders                      tuple of ≤ 64 :class:`Holder`, distinct nodes
    hashes                       concatenated 32-byte sha256 values: in ``ANNOUNCE``
                                 one per piece in ``hashed`` (in order); in ``PEERS``
                                 none, or one per piece with 32 zero bytes for unknown
    ===========================  ==============================================

Building an invalid message raises :class:`LocalProtocolError`; the decoder re-raises
it as :class:`RemoteProtocolError`, so no invalid message ever exists in memory.
Blobs above :data:`MAX_BLOB_SIZE` (64 GiB) are not shared between peers: that bound
keeps a ``PEERS`` answer with :data:`MAX_HOLDERS` holders inside one control frame.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sized
from dataclasses import dataclass, fields
from typing import ClassVar, Final, NoReturn, cast, get_args

import msgpack

from p2pd.core.bitfield import bitfield_length, check_bitfield, count_pieces, full_bitfield
from p2pd.core.digest import Digest
from p2pd.core.pieces import MAX_PIECE, PieceLayout
from p2pd.errors import DigestInvalid, LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
MAX_UINT: Final = 2**63 - 1
MAX_BLOB_SIZE: Final = 64 << 30
MAX_BITFIELD: Final = bitfield_length(PieceLayout.for_size(MAX_BLOB_SIZE).count)
"""Longest bitfield: 512 bytes, for 4096 pieces of 16 MiB."""
MAX_NODE_ID: Final = 128
MAX_ADDR: Final = 300
MAX_FEATURES: Final = 16
MAX_TOKEN: Final = 32
MAX_ERROR_MESSAGE: Final = 1024
MAX_HOLDERS: Final = 64
MAX_HASHES: Final = 32 * PieceLayout.for_size(MAX_BLOB_SIZE).count
"""Longest piece table on the wire: 128 KiB, for 4096 pieces."""
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 32

ERROR_PROTOCOL: Final = "protocol-error"
ERROR_VERSION: Final = "unsupported-version"
ERROR_AUTH: Final = "auth-failed"
REFUSE_MISSING: Final = "missing"
"""``REFUSE`` reason: the node does not hold the piece (any more)."""
REFUSE_BUSY: Final = "busy"
"""``REFUSE`` reason: the node holds the piece but is at its upload limit; ask later."""
REFUSE_CANCELLED: Final = "cancelled"
"""``REFUSE`` reason: the requester sent ``CANCEL`` before the piece went out."""
REPLICATED_HELD: Final = "held"
"""``REPLICATED`` reason: the blob was already in the cache."""
REPLICATED_FETCHED: Final = "fetched"
"""``REPLICATED`` reason: the blob was fetched from peers and verified."""
REPLICATED_FAILED: Final = "failed"
"""``REPLICATED`` reason: the blob could not be had from peers (or did not verify)."""
REPLICATED_UNSUPPORTED: Final = "unsupported"
"""``REPLICATED`` reason: the node has no cache or swarm to replicate into."""

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOKEN = re.compile(r"[a-z0-9][a-z0-9.-]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


def _fail(message: str) -> NoReturn:
    raise LocalProtocolError(message)


def _uint(name: str, value: object, high: int = MAX_UINT) -> int:
    if type(value) is not int:
        _fail(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= high:
        _fail(f"{name} out of range 0..{high}")
    return value


def _typed(name: str, value: object, kind: type, max_len: int, exact: bool = False) -> None:
    if type(value) is not kind:
        _fail(f"{name} must be {kind.__name__}, not {type(value).__name__}")
    length = len(cast(Sized, value))
    if length > max_len or (exact and length != max_len):
        _fail(f"{name} has length {length}, {'expected' if exact else 'limit'} {max_len}")


def _text(name: str, value: object, max_len: int, pattern: re.Pattern[str]) -> None:
    _typed(name, value, str, max_len)
    if not pattern.fullmatch(str(value)):
        _fail(f"{name} {value!r} is empty or has characters outside the allowed set")


def _addr(value: object) -> None:
    _typed("addr", value, str, MAX_ADDR)
    host, sep, port = str(value).rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        _fail(f"addr {value!r} is not HOST:PORT with a port in 1..65535")
    if host.startswith("[") and host.endswith("]") and "%" not in host:
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            _fail(f"addr {value!r} has a malformed IPv6 address")
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        _fail(f"addr {value!r} has a malformed host")


def _digest(value: object) -> None:
    _typed("digest", value, str, 80)
    try:
        Digest.parse(str(value))
    except DigestInvalid as exc:
        _fail(exc.message)


def _holdings(layout: PieceLayout, bitfield: bytes, complete: bool) -> None:
    try:
        check_bitfield(bitfield, layout.count)
    except ValueError as exc:
        _fail(str(exc))
    if complete and bitfield != full_bitfield(layout.count):
        _fail("a complete holder must have every piece")


def _node_id(name: str, value: object) -> None:
    _text(name, value, MAX_NODE_ID, _NODE_ID)


def _features(name: str, value: object) -> None:
    _typed(name, value, tuple, MAX_FEATURES)
    features = cast(tuple[object, ...], value)
    for feature in features:
        _text("feature", feature, MAX_TOKEN, _TOKEN)
    if len(set(features)) != len(features):
        _fail("features repeat a name")


def _holders(name: str, value: object) -> None:
    _typed(name, value, tuple, MAX_HOLDERS)
    holders = cast(tuple[object, ...], value)
    if any(type(holder) is not Holder for holder in holders):
        _fail("holders must be Holder values")
    if len({cast(Holder, holder).node_id for holder in holders}) != len(holders):
        _fail("holders repeat a node")


def _bool(name: str, value: object) -> None:
    if type(value) is not bool:
        _fail(f"{name} must be bool, not {type(value).__name__}")


_RULES: Final[dict[str, Callable[[str, object], object]]] = {
    "request_id": _uint,
    "token": _uint,
    "version": _uint,
    "size": lambda name, value: _uint(name, value, MAX_BLOB_SIZE),
    "piece_size": _uint,
    "index": _uint,
    "first_piece": _uint,
    "last_piece": _uint,
    "node_id": _node_id,
    "holder": _node_id,
    "fetcher": lambda name, value: None if value is None else _node_id(name, value),
    "nonce": lambda name, value: _typed(name, value, bytes, NONCE_SIZE, exact=True),
    "mac": lambda name, value: _typed(name, value, bytes, MAC_SIZE, exact=True),
    "features": _features,
    "code": lambda name, value: _text(name, value, MAX_TOKEN, _TOKEN),
    "reason": lambda name, value: _text(name, value, MAX_TOKEN, _TOKEN),
    "message": lambda name, value: _typed(name, value, str, MAX_ERROR_MESSAGE),
    "digest": lambda _name, value: _digest(value),
    "addr": lambda _name, value: _addr(value),
    "bitfield": lambda name, value: _typed(name, value, bytes, MAX_BITFIELD),
    "hashed": lambda name, value: _typed(name, value, bytes, MAX_BITFIELD),
    "data": lambda name, value: _typed(name, value, bytes, MAX_PIECE),
    "complete": _bool,
    "granted": _bool,
    "holders": _holders,
    "hashes": lambda name, value: _typed(name, value, bytes, MAX_HASHES),
}
"""How each field is checked on its own, by name (the blob-dependent checks follow)."""


def _check(values: dict[str, object]) -> None:
    """Check each field by its name, then the fields that depend on the blob's size."""
    for name, value in values.items():
        _RULES[name](name, value)
    if "size" not in values:
        return
    layout = PieceLayout.for_size(cast(int, values["size"]))
    if values.get("piece_size", layout.piece_size) != layout.piece_size:
        _fail(f"piece_size is not {layout.piece_size}, the size rule's for {layout.size} bytes")
    if "bitfield" in values:
        _holdings(layout, cast(bytes, values["bitfield"]), values["complete"] is True)
    if "hashed" in values:
        hashed, held = cast(bytes, values["hashed"]), cast(bytes, values["bitfield"])
        _holdings(layout, hashed, False)
        if int.from_bytes(hashed, "big") & ~int.from_bytes(held, "big"):
            _fail("hashed names a piece the bitfield does not")
    for holder in cast(tuple[Holder, ...], values.get("holders", ())):
        _holdings(layout, holder.bitfield, holder.complete)
    for name in ("index", "first_piece", "last_piece"):
        if name in values and cast(int, values[name]) >= layout.count:
            _fail(f"{name} {values[name]} is not below the blob's {layout.count} pieces")
    if cast(int, values.get("first_piece", 0)) > cast(int, values.get("last_piece", 0)):
        _fail("first_piece is after last_piece")
    if "hashes" in values:
        hashes = cast(bytes, values["hashes"])
        if "hashed" in values:
            wanted = 32 * count_pieces(cast(bytes, values["hashed"]))
            if len(hashes) != wanted:
                _fail(f"hashes must hold one sha256 per piece hashed ({wanted} bytes)")
        elif len(hashes) not in (0, 32 * layout.count):
            _fail(f"hashes must be empty or hold {layout.count} sha256 values")
    if "data" in values:
        length = layout.length(cast(int, values["index"]))
        if len(cast(bytes, values["data"])) != length:
            _fail(f"piece {values['index']} is {length} bytes, data has another length")


class _Checked:
    """Base of messages: ``__post_init__`` checks every field by its name."""

    __slots__ = ()

    def __post_init__(self) -> None:
        _check({name: getattr(self, name) for name in _FIELDS[type(self)]})


@dataclass(frozen=True, slots=True)
class Hello(_Checked):
    """The first message each way: version, who we are, our auth nonce, our features.

    Every HELLO of every version opens with ``[TAG, version]``, so an unsupported
    version is reported as such however the rest of a future HELLO looks.
    """

    TAG: ClassVar[int] = 1
    version: int
    node_id: str
    nonce: bytes
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthProof(_Checked):
    """Proof that the sender knows the cluster secret (see :mod:`p2pd.core.auth`)."""

    TAG: ClassVar[int] = 2
    mac: bytes


@dataclass(frozen=True, slots=True)
class Error(_Checked):
    """The sender closes the connection and says why (an ``ERROR_*`` code); nothing follows."""

    TAG: ClassVar[int] = 3
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Ping(_Checked):
    """Liveness check; answered by a :class:`Pong` with the same token."""

    TAG: ClassVar[int] = 4
    token: int


@dataclass(frozen=True, slots=True)
class Pong(_Checked):
    """Answer to a :class:`Ping`."""

    TAG: ClassVar[int] = 5
    token: int


@dataclass(frozen=True, slots=True)
class Have(_Checked):
    """Which pieces of a blob the sender holds, told to a peer it trades pieces with.

    ``complete``: the blob is held whole and its digest verified. A full bitfield
    without ``complete`` means every piece is in but the whole is not verified yet.
    """

    TAG: ClassVar[int] = 6
    digest: str
    size: int
    piece_size: int
    bitfield: bytes
    complete: bool


@dataclass(frozen=True, slots=True)
class Request(_Checked):
    """Ask for a piece; answered exactly once, by :class:`Piece` or :class:`Refuse`.

    ``request_id`` (as in every request) is unique among the sender's requests in flight
    on the connection.
    """

    TAG: ClassVar[int] = 7
    request_id: int
    digest: str
    size: int
    index: int


@dataclass(frozen=True, slots=True)
class Piece(_Checked):
    """A requested piece's bytes (the receiver checks them against the piece table)."""

    TAG: ClassVar[int] = 8
    request_id: int
    digest: str
    size: int
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Refuse(_Checked):
    """A requested piece will not come; ``reason`` is a ``REFUSE_*`` name."""

    TAG: ClassVar[int] = 9
    request_id: int
    digest: str
    size: int
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Cancel(_Checked):
    """The sender no longer needs the piece of its request ``request_id`` (endgame).

    The request is still answered once: by the piece if it is already on its way,
    else by :class:`Refuse` with reason ``cancelled``.
    """

    TAG: ClassVar[int] = 10
    request_id: int


@dataclass(frozen=True, slots=True)
class Announce(_Checked):
    """Tell a blob's coordinator which pieces the sender holds and where to get them, with
    the hashes of the pieces in ``hashed``: those it has not told this coordinator yet
    (so a steady stream of announcements costs the coordinator one hash each, not the
    whole table each)."""

    TAG: ClassVar[int] = 11
    digest: str
    size: int
    piece_size: int
    bitfield: bytes
    complete: bool
    addr: str
    hashed: bytes
    hashes: bytes


@dataclass(frozen=True, slots=True)
class Lookup(_Checked):
    """Ask a blob's coordinator who holds pieces of it; answered by :class:`Peers`."""

    TAG: ClassVar[int] = 12
    request_id: int
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Holder(_Checked):
    """One holder in :class:`Peers`, on the wire ``[node_id, addr, bitfield, complete]``."""

    node_id: str
    addr: str
    bitfield: bytes
    complete: bool


@dataclass(frozen=True, slots=True)
class Peers(_Checked):
    """A coordinator's answer to :class:`Lookup`; ``fetcher`` holds the upstream lease."""

    TAG: ClassVar[int] = 13
    request_id: int
    digest: str
    size: int
    holders: tuple[Holder, ...]
    fetcher: str | None
    hashes: bytes


@dataclass(frozen=True, slots=True)
class Lease(_Checked):
    """Ask a blob's coordinator for the right to fetch pieces ``first..last`` upstream."""

    TAG: ClassVar[int] = 14
    request_id: int
    digest: str
    size: int
    first_piece: int
    last_piece: int


@dataclass(frozen=True, slots=True)
class LeaseGrant(_Checked):
    """The answer to :class:`Lease`, for a span within the one requested.

    If ``granted``, the requester (then ``holder``) fetches those pieces upstream; if
    not, ``holder`` holds the lease and will share them soon.
    """

    TAG: ClassVar[int] = 15
    request_id: int
    digest: str
    size: int
    first_piece: int
    last_piece: int
    granted: bool
    holder: str


@dataclass(frozen=True, slots=True)
class Replicate(_Checked):
    """Ask a node to bring a whole blob into its cache from the swarm (a preheat), and
    answer with :class:`Replicated` once it holds it or gave up.

    The blob comes from peers only: the asker holds no registry credentials to pass on,
    so the receiver never goes upstream for it.
    """

    TAG: ClassVar[int] = 16
    request_id: int
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Replicated(_Checked):
    """The answer to :class:`Replicate`; ``reason`` is a ``REPLICATED_*`` name."""

    TAG: ClassVar[int] = 17
    request_id: int
    digest: str
    size: int
    reason: str


Message = (
    Hello | AuthProof | Error | Ping | Pong | Have | Request | Piece | Refuse | Cancel
    | Announce | Lookup | Peers | Lease | LeaseGrant | Replicate | Replicated
)
"""Any message of the peer wire protocol."""

MESSAGE_TYPES: Final[tuple[type[Message], ...]] = get_args(Message)
_BY_TAG: Final = {cls.TAG: cls for cls in MESSAGE_TYPES}
_FIELDS: Final[dict[type, tuple[str, ...]]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in (*MESSAGE_TYPES, Holder)
}


def to_wire(message: Message) -> list[object]:
    """The msgpack-ready array of ``message``: ``[TAG, field, ...]``."""
    items: list[object] = [message.TAG]
    items.extend(getattr(message, name) for name in _FIELDS[type(message)])
    if isinstance(message, Peers):
        items[4] = [[h.node_id, h.addr, h.bitfield, h.complete] for h in message.holders]
    return items


def from_wire(items: object) -> Message:
    """The message that the decoded msgpack value ``items`` stands for.

    Raises :class:`LocalProtocolError` (the decoder re-raises it as remote) for anything
    but an array of a known tag with exactly that message's fields, all valid.
    """
    if type(items) is not list or not items:
        _fail("a message must be a non-empty array")
    tag = items[0]
    cls = _BY_TAG.get(tag) if type(tag) is int else None
    if cls is None:
        _fail(f"unknown message type {tag!r:.40}")
    if cls is Hello and len(items) > 1 and type(items[1]) is int and items[1] != PROTOCOL_VERSION:
        raise LocalProtocolError(
            f"unsupported protocol version {items[1]!r:.40} (this node speaks {PROTOCOL_VERSION})",
            code=ERROR_VERSION,
        )
    values = items[1:]
    expected = len(_FIELDS[cls])
    if len(values) != expected:
        _fail(f"{cls.__name__} has {len(values)} fields, expected {expected}")
    if cls is Hello and type(values[3]) is list:
        values[3] = tuple(values[3])
    elif cls is Peers and type(values[3]) is list:
        values[3] = tuple(_holder(entry) for entry in values[3])
    return cls(*values)


def _holder(entry: object) -> Holder:
    if type(entry) is not list or len(entry) != 4:
        _fail("a holder must be an array [node_id, addr, bitfield, complete]")
    return Holder(*entry)


class _Unwanted(Exception):
    """A msgpack value our messages never contain (map, extension, too many arrays)."""


def _refuse_map(_value: object) -> object:
    raise _Unwanted("maps are not used by the protocol")


def _refuse_ext(_code: int, _data: bytes) -> object:
    raise _Unwanted("msgpack extension types are not used by the protocol")


_MAX_ARRAYS: Final = MAX_HOLDERS + 2
_UNPACK_LIMITS: Final = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": 4 * MAX_ERROR_MESSAGE,
    "max_bin_len": MAX_PIECE,
    "max_array_len": MAX_HOLDERS,
    "max_map_len": 0,
    "max_ext_len": 0,
}


def encode_message(message: Message) -> bytes:
    """The msgpack payload of ``message`` (without a frame's length prefix)."""
    payload: bytes = msgpack.packb(to_wire(message), use_bin_type=True)
    return payload


def decode_message(payload: bytes | memoryview) -> Message:
    """The message a frame's payload encodes; raise :class:`RemoteProtocolError` if none.

    msgpack runs with strict limits (no maps, no extensions, bounded strings, binaries,
    array lengths and number of arrays), so hostile bytes cannot take much memory.
    """
    arrays = 0

    def count_array(value: list[object]) -> list[object]:
        nonlocal arrays
        arrays += 1
        if arrays > _MAX_ARRAYS:
            raise _Unwanted("too many arrays")
        return value

    try:
        value = msgpack.unpackb(
            payload, list_hook=count_array, object_hook=_refuse_map, ext_hook=_refuse_ext,
            **_UNPACK_LIMITS,
        )
    except (ValueError, msgpack.UnpackException, _Unwanted) as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise RemoteProtocolError(f"malformed message: {reason}") from exc
    try:
        return from_wire(value)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(exc.message, code=exc.code) from exc
