"""How a blob is cut into pieces.

The piece size depends only on the blob's length, so every node cuts the same blob the
same way without talking to anyone. The rule: the smallest power of two that keeps the
blob within :data:`TARGET_PIECES` pieces, bounded to ``[MIN_PIECE, MAX_PIECE]``:

    ========  ===========  ======
    blob      piece size   pieces
    ========  ===========  ======
    ≤ 512 MiB   1 MiB      ≤ 512
    1 GiB       2 MiB       512
    4 GiB       8 MiB       512
    8 GiB      16 MiB       512
    > 8 GiB    16 MiB      > 512
    ========  ===========  ======

1 MiB is large enough that per-piece costs (a hash, a request, a file) are small next to
the transfer, and small enough that a 10 MB layer still spreads over ten peers. 16 MiB
bounds the memory a piece in flight takes.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
MIN_PIECE = 1 * MiB
MAX_PIECE = 16 * MiB
TARGET_PIECES = 512


def piece_size_for(size: int) -> int:
    """The piece size of a blob of ``size`` bytes (a power of two in the bounds)."""
    if size < 0:
        raise ValueError("blob size cannot be negative")
    wanted = -(-size // TARGET_PIECES)  # ceiling division
    piece = MIN_PIECE
    while piece < wanted and piece < MAX_PIECE:
        piece <<= 1
    return piece


@dataclass(frozen=True, slots=True)
class PieceLayout:
    """The pieces of a blob: piece ``i`` covers ``[i*piece_size, min((i+1)*piece_size, size))``.

    A zero-length blob has no pieces.
    """

    size: int
    piece_size: int

    @classmethod
    def for_size(cls, size: int) -> PieceLayout:
        """The layout of a blob of ``size`` bytes under the piece size rule."""
        return cls(size, piece_size_for(size))

    def __post_init__(self) -> None:
        if self.size < 0 or self.piece_size <= 0:
            raise ValueError("invalid piece layout")

    @property
    def count(self) -> int:
        """Number of pieces."""
        return -(-self.size // self.piece_size)

    def span(self, index: int) -> tuple[int, int]:
        """The half-open byte span ``(start, stop)`` of piece ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"piece {index} out of range 0..{self.count - 1}")
        start = index * self.piece_size
        return start, min(start + self.piece_size, self.size)

    def length(self, index: int) -> int:
        """Length in bytes of piece ``index``."""
        start, stop = self.span(index)
        return stop - start

    def pieces_for(self, start: int, stop: int) -> range:
        """Indices of the pieces that overlap the byte span ``[start, stop)``."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"span {start}-{stop} outside blob of {self.size} bytes")
        if start == stop:
            return range(0)
        return range(start // self.piece_size, (stop - 1) // self.piece_size + 1)
