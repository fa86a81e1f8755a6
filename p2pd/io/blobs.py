"""Blobs: the complete ones in the cache, the ones being downloaded, and reading pieces.

How it works: :class:`BlobService` owns the cache index (complete blobs and their piece
tables) and the downloads in flight. A client that asks for a blob the cache lacks joins
the blob's :class:`Download`, starting it if nobody has (one upstream fetch however many
clients wait). The download cuts the upstream stream into pieces, writes each to disk,
hashes it, and publishes it to the waiting readers. The last piece is published only after
the whole blob matched its digest, so a reader can never receive every byte of a bad blob:
on a mismatch the download fails, every reader aborts its response, and the pieces are
deleted. A broken upstream stream is resumed with ``Range`` from the first missing piece.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import httpx
import trio

from p2pd.core.bitfield import bitfield_of_mask, full_bitfield
from p2pd.core.digest import Digest
from p2pd.core.lru import LruPolicy
from p2pd.core.messages import (
    REPLICATED_FAILED,
    REPLICATED_FETCHED,
    REPLICATED_HELD,
    REPLICATED_UNSUPPORTED,
)
from p2pd.core.pieces import PieceLayout
from p2pd.errors import CorruptPiece, DigestMismatch, P2PError, UpstreamError
from p2pd.io.bodies import cut_into_pieces
from p2pd.io.download import Download, DownloadFailed, Pending
from p2pd.io.metrics import Metrics
from p2pd.io.sink import InOrderHash, PieceSink
from p2pd.io.store import DiskStore, FileRegion, PieceTable
from p2pd.io.swarm import BlobState, Swarm
from p2pd.io.upstream import Upstreams

log = logging.getLogger(__name__)

PEERS_ONLY = ""
"""The registry of a download that must not go upstream (a preheat replica)."""
UPSTREAM_ATTEMPTS = 4
RETRY_DELAY = 0.5
STORE_AHEAD = 3


class BlobService:
    """The cache index, the downloads in flight, and verified piece reads."""

    def __init__(
        self,
        store: DiskStore,
        upstreams: Upstreams,
        metrics: Metrics,
        lru: LruPolicy[Digest],
        nursery: trio.Nursery,
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.metrics = metrics
        self.lru = lru
        self._nursery = nursery
        self.tables: dict[Digest, PieceTable] = {}
        self.downloads: dict[Digest, Download] = {}
        self.swarm: Swarm | None = None
        """Set when the daemon has peers: downloads then go through the swarm."""

    async def open(self) -> None:
        """Index what the cache directory holds."""
        for table in await trio.to_thread.run_sync(self.store.open):
            self.tables[table.digest] = table
            self.lru.add(table.digest, table.size)
        self._update_gauges()
        log.info("cache: %d blobs, %d bytes in %s", len(self.tables), self.lru.total_bytes,
                 self.store.root)

    def _update_gauges(self) -> None:
        self.metrics.cache_bytes.set(self.lru.total_bytes)
        self.metrics.cache_blobs.set(len(self.tables))
        self.metrics.blobs_in_flight.set(len(self.downloads))

    def complete(self, digest: Digest) -> PieceTable | None:
        """The piece table of ``digest`` if the cache holds the whole verified blob."""
        return self.tables.get(digest)

    def download(
        self, registry: str, name: str, digest: Digest, size: int,
        headers: Sequence[tuple[str, str]],
    ) -> Download:
        """Join the download of ``digest``, starting it (with ``headers``) if none runs."""
        found = self.downloads.get(digest)
        if found is not None:
            return found
        dl = Download(digest, PieceLayout.for_size(size))
        self.downloads[digest] = dl
        self.lru.pin(digest)
        self._update_gauges()
        self._nursery.start_soon(self._run_download, dl, registry, name, list(headers))
        return dl

    async def _run_download(
        self, dl: Download, registry: str, name: str, headers: list[tuple[str, str]]
    ) -> None:
        try:
            await self._make_room(dl.layout.size)
            if self.swarm is not None and dl.layout.count > 0:
                await self._fetch_swarm(self.swarm, dl, registry, name, headers)
            else:
                await self._fetch_upstream(dl, registry, name, headers)
        except Exception as exc:
            # A download is a fault boundary: whatever breaks it, its readers' answers are
            # cut short (containerd retries or falls back) and the daemon carries on.
            if isinstance(exc, (P2PError, OSError)):
                log.warning("blob %s: download failed: %s", dl.digest.short, exc)
            else:
                log.exception("blob %s: download failed unexpectedly", dl.digest.short)
            if isinstance(exc, DigestMismatch):
                self.metrics.digest_mismatches.inc()
            dl.fail(exc)
            await self._delete(dl.digest)
        finally:
            if dl.error is None and dl.digest not in self.tables:
                dl.fail(DownloadFailed("download was interrupted"))
            del self.downloads[dl.digest]
            self.lru.unpin(dl.digest)
            self._update_gauges()

    async def _fetch_upstream(
        self, dl: Download, registry: str, name: str, headers: list[tuple[str, str]]
    ) -> None:
        digest = dl.digest
        sink = PieceSink(self.store, digest, functools.partial(self._stored, dl))
        try:
            await self._fetch_pieces(dl, sink, registry, name, headers)
            actual = await sink.finish()
        finally:
            sink.close()
        if actual != bytes.fromhex(digest.hex):
            raise DigestMismatch(f"upstream bytes of {digest.short} hash to "
                                 f"sha256:{actual.hex()[:12]}")
        await self._commit(dl)

    async def _fetch_swarm(
        self, swarm: Swarm, dl: Download, registry: str, name: str,
        headers: list[tuple[str, str]],
    ) -> None:
        layout, digest = dl.layout, dl.digest
        state = BlobState(str(digest), layout.size, layout.count, set(), [None] * layout.count)
        hasher = InOrderHash(self.store, digest, layout.count,
                             lambda i: dl.hashes[i] is not None, dl.recent.get)

        storing: dict[int, trio.Event] = {}

        async def store(index: int, data: bytes, source: str) -> bool:
            while index in storing:  # an endgame duplicate: see how the first one fares
                await storing[index].wait()
            known = dl.hashes[index]
            if known is not None:  # a late copy: still checked, so a liar is caught
                data_hash = await trio.to_thread.run_sync(_sha256, data)
                return data_hash == known
            expected = state.hashes[index] if source == "peer" else None
            storing[index] = trio.Event()
            try:
                piece_hash = await trio.to_thread.run_sync(
                    self.store.write_piece, digest, index, data, expected)
            finally:
                storing.pop(index).set()
            if piece_hash is None:
                return False
            state.hashes[index] = dl.hashes[index] = piece_hash
            dl.bytes_by_source[source] = dl.bytes_by_source.get(source, 0) + len(data)
            self.metrics.blob_bytes_fetched.labels(source).inc(len(data))
            self.metrics.pieces_fetched.labels(source).inc()
            dl.remember(index, data)
            if index < layout.count - 1:
                dl.publish(index)
            hasher.advance()
            return True

        async def fetch_range(first: int, stop: int,
                              on_piece: Callable[[int, bytes], Awaitable[None]]) -> None:
            await self._upstream_range(dl, registry, name, headers, first, stop, on_piece)

        try:
            await swarm.fetch(str(digest), layout.size, store, fetch_range, state,
                              peers_only=registry == PEERS_ONLY)
            actual = await hasher.digest()
        finally:
            hasher.close()
        if actual != bytes.fromhex(digest.hex):
            raise DigestMismatch(f"bytes of {digest.short} from the swarm hash to "
                                 f"sha256:{actual.hex()[:12]}")
        await self._commit(dl)
        if layout.count:  # the last piece is served from now on: tell the swarm
            state.held.add(layout.count - 1)
            await swarm.announce(state)

    async def _commit(self, dl: Download) -> None:
        table = PieceTable(dl.digest, dl.layout, tuple(h for h in dl.hashes if h is not None))
        await trio.to_thread.run_sync(self.store.commit, table)
        self.tables[dl.digest] = table
        self.lru.add(dl.digest, dl.layout.size)
        if dl.layout.count:
            dl.publish(dl.layout.count - 1)

    async def _upstream_range(
        self, dl: Download, registry: str, name: str, headers: list[tuple[str, str]],
        first: int, stop: int, on_piece: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        """Fetch pieces ``first..stop-1`` with one ``Range`` GET, each to ``on_piece``."""
        layout = dl.layout
        start, end = layout.span(first)[0], layout.span(stop - 1)[1]
        path = f"/v2/{name}/blobs/{dl.digest}"
        range_header = [("Range", f"bytes={start}-{end - 1}")]
        response = await self.upstreams.send(registry, "GET", path, headers + range_header,
                                              kind="blob")
        room = trio.Semaphore(STORE_AHEAD)
        failures: list[Exception] = []
        try:
            # Pieces are stored on the side, a few at a time, so the stream keeps flowing;
            # errors are collected, not raised inside the nursery (no exception groups).
            async with trio.open_nursery() as nursery:
                try:
                    await self._read_range(response, layout, first, stop, start, room,
                                           nursery, on_piece, failures)
                except (P2PError, httpx.HTTPError) as exc:
                    failures.insert(0, exc)
        finally:
            await response.aclose()
        if failures:
            if isinstance(failures[0], httpx.HTTPError):
                raise UpstreamError(f"upstream stream broke: {failures[0]!r}") from failures[0]
            raise failures[0]

    async def _read_range(
        self, response: httpx.Response, layout: PieceLayout, first: int, stop: int,
        start: int, room: trio.Semaphore, nursery: trio.Nursery,
        on_piece: Callable[[int, bytes], Awaitable[None]], failures: list[Exception],
    ) -> None:
        if response.status_code not in (200, 206):
            raise UpstreamError(f"upstream answered {response.status_code} to a blob GET")

        async def aside(index: int, data: bytes) -> None:
            await room.acquire()
            nursery.start_soon(_stored_aside, room, on_piece, index, data, failures)

        await cut_into_pieces(response, layout, first, stop,
                              skip=start if response.status_code == 200 else 0,
                              throttle=self.upstreams.throttle, on_piece=aside, whole=False,
                              stop_early=lambda: bool(failures))

    async def _fetch_pieces(
        self, dl: Download, sink: PieceSink, registry: str, name: str,
        headers: list[tuple[str, str]],
    ) -> None:
        layout, digest = dl.layout, dl.digest
        next_piece, failures = 0, 0
        self.metrics.upstream_fetches.inc()
        while next_piece < layout.count:
            offset = layout.span(next_piece)[0]
            extra = [("Range", f"bytes={offset}-")] if offset else []
            try:
                next_piece = await self._stream_pieces(
                    dl, sink, next_piece, registry, f"/v2/{name}/blobs/{digest}",
                    headers + extra,
                )
            except UpstreamError as exc:
                failures += 1
                if failures >= UPSTREAM_ATTEMPTS:
                    raise
                log.info("blob %s: upstream broke at piece %d (%s); resuming",
                         digest.short, next_piece, exc)
                await trio.sleep(RETRY_DELAY * failures)

    async def _stream_pieces(
        self, dl: Download, sink: PieceSink, index: int, registry: str, path: str,
        headers: list[tuple[str, str]],
    ) -> int:
        """Read pieces from one upstream response starting at ``index``; return the next."""
        response = await self.upstreams.send(registry, "GET", path, headers, kind="blob")
        try:
            expected = 206 if index else 200
            if response.status_code != expected:
                raise UpstreamError(f"upstream answered {response.status_code} to a blob GET")
            return await cut_into_pieces(response, dl.layout, index, dl.layout.count,
                                         throttle=self.upstreams.throttle, on_piece=sink.put,
                                         whole=True)
        finally:
            await response.aclose()

    def _stored(self, dl: Download, index: int, data: bytes, digest: bytes) -> None:
        """A piece fetched from upstream is on disk: let readers have it."""
        dl.hashes[index] = digest
        dl.bytes_by_source["upstream"] = dl.bytes_by_source.get("upstream", 0) + len(data)
        self.metrics.blob_bytes_fetched.labels("upstream").inc(len(data))
        dl.remember(index, data)
        if index < dl.layout.count - 1:
            dl.publish(index)

    def touch(self, digest: Digest) -> None:
        """Record a use of a cached blob (LRU order, kept across restarts as atime)."""
        self.lru.touch(digest)
        self.store.touch(digest)

    async def _make_room(self, incoming: int) -> None:
        for digest in self.lru.choose_evictions(incoming):
            # A reader may have pinned it while an earlier victim was being deleted.
            if self.lru.is_pinned(digest) or digest not in self.tables:
                continue
            self.lru.remove(digest)
            table = self.tables.pop(digest)
            self._announce_gone(digest, table.size)
            self.metrics.cache_evictions.inc()
            log.info("cache: evicting %s", digest.short)
            await self._delete(digest)
        self._update_gauges()

    def _announce_gone(self, digest: Digest, size: int) -> None:
        """Tell the swarm we no longer hold a blob, so nobody asks us for it."""
        if self.swarm is not None:
            count = PieceLayout.for_size(size).count
            state = BlobState(str(digest), size, count, set(), [None] * count)
            self._nursery.start_soon(self.swarm.announce, state)

    async def _delete(self, digest: Digest) -> None:
        # Detaching is one rename, done at once so a new download of the same digest
        # starts from an empty directory; the slow removal runs on a thread.
        doomed = self.store.detach_blob(digest)
        if doomed is not None:
            await trio.to_thread.run_sync(self.store.remove_detached, doomed)

    async def drop_corrupt(self, digest: Digest) -> None:
        """Forget and delete a cached blob found damaged on disk."""
        self.metrics.corrupt_pieces.inc()
        table = self.tables.pop(digest, None)
        if table is not None:
            self._announce_gone(digest, table.size)
            self.lru.remove(digest)
            log.warning("cache: blob %s damaged on disk; dropped", digest.short)
            await self._delete(digest)
        self._update_gauges()

    def holdings(self, digest_text: str, size: int) -> tuple[bytes, bool] | None:
        """The pieces of a blob this node serves to peers (a bitfield) and whether it is
        complete, or ``None`` if it serves none (told to askers in ``HAVE``)."""
        digest = Digest.parse(digest_text)  # checked when the message was decoded
        dl = self.downloads.get(digest)
        if dl is not None and dl.layout.size == size:
            return bitfield_of_mask(dl.published, dl.layout.count), False
        table = self.tables.get(digest)
        if table is not None and table.size == size:
            return full_bitfield(table.layout.count), True
        return None

    async def piece_for_peer(self, digest_text: str, size: int, index: int) -> bytes | None:
        """Verified bytes of a piece for a peer, or ``None`` if this node does not hold it.

        Complete blobs and the published pieces of downloads in flight both count, so
        other nodes can fetch a layer that is still arriving here.
        """
        digest = Digest.parse(digest_text)
        dl = self.downloads.get(digest)
        if dl is not None and dl.layout.size == size and index < dl.layout.count:
            expected = dl.hashes[index]
            if not dl.published >> index & 1 or expected is None:
                return None
            return await self._downloaded_piece(dl, index, expected)
        table = self.tables.get(digest)
        if table is None or table.size != size or index >= table.layout.count:
            return None
        try:
            part = await self._cached_piece(table, index)
        except CorruptPiece:
            return None
        if isinstance(part, bytes):
            return part
        try:  # known good: a read from the page cache, no hash
            return os.pread(part.fd, part.length, 0)
        finally:
            part.close()

    async def replicate(self, digest_text: str, size: int) -> str:
        """Bring a whole blob into the cache from peers, for a preheat another node asked
        for; the ``REPLICATED_*`` reason once it is held or given up on."""
        reason = await self._replicate(Digest.parse(digest_text), size)
        self.metrics.replications.labels(reason).inc()
        return reason

    async def _replicate(self, digest: Digest, size: int) -> str:
        table = self.tables.get(digest)
        if table is not None and table.size == size:
            self.touch(digest)
            return REPLICATED_HELD
        if self.swarm is None or size == 0:
            return REPLICATED_UNSUPPORTED
        dl = self.download(PEERS_ONLY, "", digest, size, ())
        try:
            await dl.wait_piece(dl.layout.count - 1)
        except DownloadFailed as exc:
            log.info("blob %s: preheat replica failed: %s", digest.short, exc.__cause__)
            return REPLICATED_FAILED
        log.info("blob %s: preheat replica held (%s)", digest.short,
                 ", ".join(f"{k} {v}" for k, v in sorted(dl.bytes_by_source.items())))
        return REPLICATED_FETCHED

    def held_states(self) -> list[BlobState]:
        """Every complete cached blob, as announced to the swarm."""
        return [BlobState(str(t.digest), t.size, t.layout.count, set(range(t.layout.count)),
                          list(t.hashes)) for t in self.tables.values()]

    def prefetch(self, read: Callable[[], Awaitable[bytes | FileRegion]]) -> Pending:
        """Run the coroutine function ``read`` in the background; collect its outcome."""
        pending = Pending()

        async def runner() -> None:
            try:
                pending.value = await read()
            except Exception as exc:
                pending.error = exc
            finally:
                pending.done.set()
                if pending.discarded:
                    pending.discard()

        self._nursery.start_soon(runner)
        return pending

    async def read_piece(
        self, digest: Digest, index: int, dl: Download | None
    ) -> bytes | FileRegion:
        """Piece ``index`` of ``digest``, known good, from a download in flight or the cache.

        A :class:`FileRegion` (an open file to ``sendfile``) is returned for cached pieces
        that verified before and have not changed since; otherwise verified bytes.
        """
        if dl is not None:
            data = await self._downloaded_piece(dl, index, await dl.wait_piece(index))
            if data is None:
                raise CorruptPiece(f"piece {index} of {digest.short} changed on disk")
            return data
        table = self.tables.get(digest)
        if table is None:
            raise CorruptPiece(f"blob {digest.short} left the cache while being served")
        return await self._cached_piece(table, index)

    async def _downloaded_piece(self, dl: Download, index: int, expected: bytes) -> bytes | None:
        """A published piece of a download in flight, or ``None`` if its file changed."""
        data = dl.recent.get(index)
        if data is not None:
            return data
        return await trio.to_thread.run_sync(
            self.store.downloading_piece, dl.digest, index, expected)

    async def _cached_piece(self, table: PieceTable, index: int) -> bytes | FileRegion:
        """A piece of a complete blob, known good; a damaged blob is dropped and
        :class:`CorruptPiece` raised."""
        region = self.store.trusted_region(table, index)
        if region is not None:
            return region
        try:
            return await trio.to_thread.run_sync(self.store.read_piece, table, index)
        except CorruptPiece:
            await self.drop_corrupt(table.digest)
            raise
        except FileNotFoundError as exc:
            await self.drop_corrupt(table.digest)
            raise CorruptPiece(f"piece {index} of {table.digest.short} is missing") from exc


async def _stored_aside(
    room: trio.Semaphore, on_piece: Callable[[int, bytes], Awaitable[None]],
    index: int, data: bytes, failures: list[Exception],
) -> None:
    try:
        await on_piece(index, data)
    except (P2PError, OSError) as exc:
        failures.append(exc)
    finally:
        room.release()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
