"""A blob being downloaded, as its readers see it, and piece reads in the background."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from p2pd.core.digest import Digest
from p2pd.core.pieces import PieceLayout
from p2pd.errors import P2PError
from p2pd.io.store import FileRegion

RECENT_BYTES = 4 << 20
"""Newest pieces of a download kept in memory for readers that keep pace with it."""


class DownloadFailed(P2PError):
    """The download a reader was waiting on failed; the reason is chained."""


@dataclass
class Download:
    """A blob being fetched; readers wait for its pieces with :meth:`wait_piece`."""

    digest: Digest
    layout: PieceLayout
    hashes: list[bytes | None] = field(default_factory=list)
    published: int = 0  # the pieces readers and peers may have: bit i = piece i
    error: BaseException | None = None
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    accounted: bool = False
    """Whether a response has reported ``bytes_by_source`` (in ``p2pd status``)."""
    # The newest pieces stay in memory, so readers keeping pace with the download get
    # them without reading and hashing the file again.
    recent: dict[int, bytes] = field(default_factory=dict)
    recent_bytes: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.hashes = [None] * self.layout.count

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def publish(self, index: int) -> None:
        self.published |= 1 << index
        self._notify()

    def remember(self, index: int, data: bytes) -> None:
        """Keep piece ``index`` in memory for readers, within :data:`RECENT_BYTES`."""
        self.recent[index] = data
        self.recent_bytes += len(data)
        while self.recent_bytes > RECENT_BYTES and len(self.recent) > 1:
            oldest = min(self.recent)
            self.recent_bytes -= len(self.recent.pop(oldest))

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    async def wait_piece(self, index: int) -> bytes:
        """Wait until piece ``index`` may be served; return its sha256."""
        while True:
            if self.error is not None:
                raise DownloadFailed(f"download of {self.digest.short} failed") from self.error
            digest = self.hashes[index]
            if self.published >> index & 1 and digest is not None:
                return digest
            await self._changed.wait()


class Pending:
    """The outcome of a piece read running in the background."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: bytes | FileRegion | None = None
        self.error: Exception | None = None
        self.discarded = False

    async def result(self) -> bytes | FileRegion:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value

    def discard(self) -> None:
        """Nobody will take the result: release it (now or when it arrives)."""
        self.discarded = True
        if isinstance(self.value, FileRegion):
            self.value.close()
            self.value = None
