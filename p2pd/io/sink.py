"""Writing a download's pieces to disk off the event loop.

How it works: the event loop cuts the incoming stream into pieces and :meth:`PieceSink.put`
queues each one (waiting only when :data:`MAX_QUEUED` are already queued). One worker
thread per download takes them in order: it feeds the whole-blob sha256, hashes the piece
and writes its file. When a piece is on disk the worker hands its hash back to the event
loop (``TrioToken.run_sync_soon``), which calls ``on_stored`` there. One thread call per
piece and no waiting for it keeps receiving and hashing on two cores at once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Callable

import trio

from p2pd.core.digest import Digest
from p2pd.io.store import DiskStore

MAX_QUEUED = 3


class PieceSink:
    """Stores the pieces of one blob, in order, on a worker thread."""

    def __init__(
        self, store: DiskStore, digest: Digest, on_stored: Callable[[int, bytes, bytes], None]
    ) -> None:
        self._store = store
        self._digest = digest
        self._on_stored = on_stored
        self._blob_hash = hashlib.sha256()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, f"p2pd-{digest.short}")
        self._token = trio.lowlevel.current_trio_token()
        self._queued = 0
        self._error: BaseException | None = None
        self._changed = trio.Event()

    def _work(self, index: int, data: bytes) -> bytes:
        self._blob_hash.update(data)
        piece_hash = self._store.write_piece(self._digest, index, data)
        assert piece_hash is not None  # nothing expected, nothing refused
        return piece_hash

    def _finished(self, index: int, data: bytes, future: concurrent.futures.Future[bytes]) -> None:
        # Runs on the event loop.
        self._queued -= 1
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._error = self._error or error
        elif self._error is None:
            self._on_stored(index, data, future.result())
        self._changed.set()
        self._changed = trio.Event()

    def _report(self, index: int, data: bytes, future: concurrent.futures.Future[bytes]) -> None:
        # Runs on the worker thread.
        try:
            self._token.run_sync_soon(self._finished, index, data, future)
        except trio.RunFinishedError:
            pass  # the daemon is shutting down; nobody waits for this piece

    async def put(self, index: int, data: bytes) -> None:
        """Queue piece ``index``; raise the error of an earlier piece that failed."""
        while self._queued >= MAX_QUEUED and self._error is None:
            await self._changed.wait()
        if self._error is not None:
            raise self._error
        self._queued += 1
        future = self._executor.submit(self._work, index, data)
        future.add_done_callback(lambda f: self._report(index, data, f))

    async def finish(self) -> bytes:
        """Wait until every queued piece is stored; return the whole blob's sha256."""
        while self._queued and self._error is None:
            await self._changed.wait()
        if self._error is not None:
            raise self._error
        return self._blob_hash.digest()

    def close(self) -> None:
        """Stop the worker; pieces still queued are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class InOrderHash:
    """The whole-blob sha256 of a blob whose pieces arrive in any order.

    After each stored piece, :meth:`advance` hashes (on a worker thread) every piece from
    the first unhashed one while they are present, taking recent pieces from memory and
    the rest from disk, so the digest is ready almost as soon as the last piece is.
    """

    def __init__(
        self, store: DiskStore, digest: Digest, count: int,
        stored: Callable[[int], bool], recent: Callable[[int], bytes | None],
    ) -> None:
        self._store, self._digest, self._count = store, digest, count
        self._stored, self._recent = stored, recent
        self._hash = hashlib.sha256()
        self._next = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, f"p2pd-hash-{digest.short}")
        self._last: concurrent.futures.Future[None] | None = None

    def _run(self) -> None:
        while self._next < self._count and self._stored(self._next):
            data = self._recent(self._next)
            if data is None:
                data = self._store.read_unverified_piece(self._digest, self._next)
            self._hash.update(data)
            self._next += 1

    def advance(self) -> None:
        """Hash what can be hashed now, in the background."""
        self._last = self._executor.submit(self._run)

    async def digest(self) -> bytes:
        """The blob's sha256, once every piece is stored."""
        self.advance()
        last = self._last
        assert last is not None
        await trio.to_thread.run_sync(last.result)
        if self._next != self._count:
            raise RuntimeError("InOrderHash.digest called before every piece was stored")
        return self._hash.digest()

    def close(self) -> None:
        """Stop the worker."""
        self._executor.shutdown(wait=False, cancel_futures=True)
