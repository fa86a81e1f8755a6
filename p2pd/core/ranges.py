"""HTTP ``Range`` headers on blobs (RFC 9110 §14), single ranges only.

containerd resumes an interrupted pull with ``Range: bytes=N-``; other clients may send
``bytes=N-M`` or a suffix ``bytes=-N``. A request for several ranges at once is legal
HTTP that a server may ignore, and we do: it is answered with the whole blob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pd.errors import RangeInvalid, RangeNotSatisfiable

_SPEC = re.compile(r"bytes[ \t]*=[ \t]*(.*)", re.IGNORECASE | re.DOTALL)
_ONE = re.compile(r"[ \t]*([0-9]{0,19})[ \t]*-[ \t]*([0-9]{0,19})[ \t]*")
MAX_HEADER = 1024


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The half-open byte span ``[start, stop)`` of a blob of ``size`` bytes."""

    start: int
    stop: int
    size: int

    @property
    def length(self) -> int:
        """How many bytes the span holds."""
        return self.stop - self.start

    @property
    def is_whole(self) -> bool:
        """Whether the span is the whole blob (answer 200, not 206)."""
        return self.start == 0 and self.stop == self.size

    def content_range(self) -> str:
        """The ``Content-Range`` value of a 206 answer."""
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange:
    """Resolve a ``Range`` header against a blob of ``size`` bytes.

    ``None`` (no header) and multi-range requests give the whole blob. A malformed header
    raises :class:`RangeInvalid`; a range that starts beyond the end, or an empty suffix,
    raises :class:`RangeNotSatisfiable`. An end beyond the blob is clipped, as RFC 9110
    requires.
    """
    whole = ByteRange(0, size, size)
    if header is None:
        return whole
    if len(header) > MAX_HEADER:
        raise RangeInvalid("Range header is too long")
    match = _SPEC.fullmatch(header)
    if match is None:
        raise RangeInvalid(f"Range header {header[:60]!r} is not a bytes range")
    specs = match.group(1).split(",")
    if len(specs) > 1:
        return whole
    one = _ONE.fullmatch(specs[0])
    if one is None:
        raise RangeInvalid(f"Range header {header[:60]!r} is malformed")
    first, last = one.group(1), one.group(2)
    if not first and not last:
        raise RangeInvalid(f"Range header {header[:60]!r} has neither start nor end")
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("empty suffix range", size)
        return ByteRange(max(0, size - suffix), size, size)
    start = int(first)
    if last and int(last) < start:
        raise RangeInvalid(f"Range header {header[:60]!r} ends before it starts")
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, blob has {size} bytes", size)
    stop = size if not last else min(size, int(last) + 1)
    return ByteRange(start, stop, size)
