"""Bitfields: which pieces of a blob a node holds, as bytes on the wire.

Piece ``i`` is bit ``7 - i % 8`` of byte ``i // 8`` (most significant bit first, as in
BitTorrent). A blob of ``count`` pieces has a bitfield of exactly ``ceil(count / 8)``
bytes, and the unused bits at the end of the last byte must be zero, so every set of
pieces has exactly one encoding and two bitfields are equal when the sets are.

The functions raise :class:`ValueError` on a malformed bitfield; the wire decoder turns
that into a protocol error.
"""

from __future__ import annotations

from collections.abc import Iterable


def bitfield_length(count: int) -> int:
    """The length in bytes of the bitfield of a blob of ``count`` pieces."""
    if count < 0:
        raise ValueError("a piece count cannot be negative")
    return (count + 7) // 8


def check_bitfield(bits: bytes, count: int) -> None:
    """Raise :class:`ValueError` unless ``bits`` is a well-formed bitfield of ``count`` pieces."""
    expected = bitfield_length(count)
    if len(bits) != expected:
        raise ValueError(
            f"bitfield of {len(bits)} bytes for {count} pieces (expected {expected})"
        )
    spare = expected * 8 - count
    if spare and bits[-1] & ((1 << spare) - 1):
        raise ValueError("bitfield has bits set past the last piece")


def pack_bitfield(indices: Iterable[int], count: int) -> bytes:
    """The bitfield of ``count`` pieces with exactly the pieces in ``indices`` set."""
    field = bytearray(bitfield_length(count))
    for index in indices:
        if not 0 <= index < count:
            raise ValueError(f"piece {index} out of range 0..{count - 1}")
        field[index >> 3] |= 0x80 >> (index & 7)
    return bytes(field)


_REVERSED = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def bitfield_of_mask(mask: int, count: int) -> bytes:
    """The bitfield of ``count`` pieces holding piece ``i`` where bit ``i`` of ``mask`` is
    set: ``pack_bitfield`` of those pieces, without listing them (a coordinator answers a
    lookup with one per holder)."""
    if not 0 <= mask < 1 << count:
        raise ValueError(f"mask has bits set past piece {count - 1}")
    return mask.to_bytes(bitfield_length(count), "little").translate(_REVERSED)


def mask_of_bitfield(bits: bytes, count: int) -> int:
    """The inverse of :func:`bitfield_of_mask` (checked like :func:`unpack_bitfield`)."""
    check_bitfield(bits, count)
    return int.from_bytes(bits.translate(_REVERSED), "little")


def indices_of_mask(mask: int) -> list[int]:
    """The positions of the bits set in ``mask``, ascending, in one step per bit set."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def unpack_bitfield(bits: bytes, count: int) -> frozenset[int]:
    """The set of pieces that ``bits`` (a bitfield of ``count`` pieces) holds."""
    check_bitfield(bits, count)
    return frozenset(
        (position << 3) + offset
        for position, byte in enumerate(bits)
        if byte
        for offset in range(8)
        if byte & (0x80 >> offset)
    )


def full_bitfield(count: int) -> bytes:
    """The bitfield of ``count`` pieces with every piece set."""
    whole, rest = divmod(count, 8)
    return b"\xff" * whole + (bytes([(0xFF00 >> rest) & 0xFF]) if rest else b"")


def count_pieces(bits: bytes) -> int:
    """How many pieces ``bits`` holds (the number of set bits)."""
    return int.from_bytes(bits, "big").bit_count()


def has_piece(bits: bytes, index: int) -> bool:
    """Whether ``bits`` holds piece ``index`` (``False`` past its end)."""
    position = index >> 3
    if index < 0 or position >= len(bits):
        return False
    return bool(bits[position] & (0x80 >> (index & 7)))
