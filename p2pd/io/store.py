"""The piece cache on disk.

Layout under the cache directory::

    blobs/sha256/<hex>/<index>     one file per piece (decimal index)
    blobs/sha256/<hex>/table       msgpack piece table; present only once every piece is
                                   on disk and the whole blob matched its digest
    manifests/sha256/<hex>         msgpack {media_type, body}, verified on write and read
    tmp/                           partial files; emptied at start

Every file is written under ``tmp/`` and renamed into place, so a crash (``kill -9``)
leaves either nothing or a whole file. A blob without a ``table`` is an interrupted
download and is deleted at start. Piece bytes are checked against the table on every
read, so a file damaged on disk is caught before a byte of it is served. Hashing every
read would make a cache hit slower than the registry, so a piece that verified once is
remembered with its file identity (inode, size, mtime, ctime): while those are unchanged
the file is sent with ``sendfile`` unread; any write to the file changes its ctime and
sends it through verification again. Identities are kept in memory only, so after a
restart every piece is verified on its first read.

All methods here block (file I/O); the async layer calls them through
``trio.to_thread``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgpack

from p2pd.core.digest import Digest
from p2pd.core.pieces import PieceLayout
from p2pd.errors import CorruptPiece, DigestMismatch

log = logging.getLogger(__name__)

TABLE_VERSION = 1
# A file is trusted by identity only once its ctime is this old: timestamps are coarse
# (a clock tick), and a write in the same tick as the last one would not show.
SETTLE_NS = 2_000_000_000
_FileKey = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class FileRegion:
    """An open piece file whose bytes are known good: send it with ``sendfile``.

    The receiver owns ``fd`` and must :meth:`close` it.
    """

    fd: int
    length: int

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class PieceTable:
    """A blob's size, its piece layout and the sha256 of each piece."""

    digest: Digest
    layout: PieceLayout
    hashes: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return self.layout.size

    def encode(self) -> bytes:
        return bytes(msgpack.packb(
            {"v": TABLE_VERSION, "size": self.layout.size,
             "piece": self.layout.piece_size, "hashes": list(self.hashes)}
        ))

    @classmethod
    def decode(cls, digest: Digest, raw: bytes) -> PieceTable:
        doc = msgpack.unpackb(raw)
        if not isinstance(doc, dict) or doc.get("v") != TABLE_VERSION:
            raise ValueError("unknown piece table version")
        layout = PieceLayout(int(doc["size"]), int(doc["piece"]))
        hashes = tuple(doc["hashes"])
        if len(hashes) != layout.count or not all(
            isinstance(h, bytes) and len(h) == 32 for h in hashes
        ):
            raise ValueError("piece table does not match its layout")
        return cls(digest, layout, hashes)


class DiskStore:
    """Blob pieces and manifests in a directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_root = root / "blobs" / "sha256"
        self.manifest_root = root / "manifests" / "sha256"
        self.tmp = root / "tmp"
        self._trusted: dict[Digest, dict[int, _FileKey]] = {}

    def open(self) -> list[PieceTable]:
        """Create the layout, drop interrupted downloads, and index complete blobs.

        Returns the tables of the blobs found, oldest access first (for the LRU).
        """
        for directory in (self.blob_root, self.manifest_root, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            _remove(leftover)
        found: list[tuple[float, PieceTable]] = []
        for entry in self.blob_root.iterdir():
            table = self._recover(entry)
            if table is None:
                log.info("cache: dropping incomplete blob %s", entry.name[:12])
                _remove(entry)
            else:
                found.append((entry.stat().st_atime, table))
        found.sort(key=lambda item: item[0])
        return [table for _, table in found]

    def _recover(self, entry: Path) -> PieceTable | None:
        try:
            digest = Digest.parse("sha256:" + entry.name)
            table = PieceTable.decode(digest, (entry / "table").read_bytes())
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            log.debug("cache: %s unusable: %s", entry.name[:12], exc)
            return None
        for index in range(table.layout.count):
            try:
                if (entry / str(index)).stat().st_size != table.layout.length(index):
                    return None
            except OSError:
                return None
        return table

    def blob_dir(self, digest: Digest) -> Path:
        return self.blob_root / digest.hex

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def write_piece(
        self, digest: Digest, index: int, data: bytes, expected: bytes | None = None
    ) -> bytes | None:
        """Store piece ``index`` of a blob being downloaded; return its sha256.

        With ``expected`` (a piece from a peer), bytes that do not hash to it are not
        written and ``None`` is returned.

        The file is trusted from here on (see :meth:`trusted_region`): these are the
        bytes just hashed, and ``fstat`` of the new file records its identity. On
        filesystems with multigrain timestamps (ext4, xfs, btrfs, tmpfs on Linux ≥ 6.13)
        that ``fstat`` makes any later write change the ctime.
        """
        piece_hash = hashlib.sha256(data).digest()
        if expected is not None and piece_hash != expected:
            return None
        directory = self.blob_dir(digest)
        directory.mkdir(exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.replace(tmp, directory / str(index))
            st = os.fstat(f.fileno())  # after the rename, which sets the ctime too
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        self._trusted.setdefault(digest, {})[index] = key
        return piece_hash

    def commit(self, table: PieceTable) -> None:
        """Mark a blob complete; call only after the whole blob matched its digest."""
        self._atomic_write(self.blob_dir(table.digest) / "table", table.encode())

    def trusted_region(self, table: PieceTable, index: int) -> FileRegion | None:
        """Piece ``index`` as an open file if it is unchanged since it last verified.

        Only an ``open`` and an ``fstat``: cheap enough to call from the event loop.
        Returns ``None`` when the piece must be read and verified (:meth:`read_piece`).
        """
        known = self._trusted.get(table.digest, {}).get(index)
        if known is None:
            return None
        try:
            fd = os.open(self.blob_dir(table.digest) / str(index), os.O_RDONLY)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != known:
            os.close(fd)
            return None
        return FileRegion(fd, st.st_size)

    def read_piece(self, table: PieceTable, index: int) -> bytes:
        """Read piece ``index`` and check it against the table.

        Raises :class:`CorruptPiece` if the bytes do not match, ``FileNotFoundError`` if
        the file is gone. A piece that matches and has settled is trusted from then on
        (see :meth:`trusted_region`).
        """
        with open(self.blob_dir(table.digest) / str(index), "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        if hashlib.sha256(data).digest() != table.hashes[index]:
            self._trusted.get(table.digest, {}).pop(index, None)
            raise CorruptPiece(f"piece {index} of {table.digest.short} does not match its hash")
        if time.time_ns() - st.st_ctime_ns > SETTLE_NS:
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            self._trusted.setdefault(table.digest, {})[index] = key
        return data

    def downloading_piece(self, digest: Digest, index: int, expected: bytes) -> bytes | None:
        """A piece of a blob still downloading, known good, or ``None`` if it is not.

        Unchanged since this process wrote it: read as is; otherwise hashed again.
        """
        path = self.blob_dir(digest) / str(index)
        known = self._trusted.get(digest, {}).get(index)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        if known == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return data
        return data if hashlib.sha256(data).digest() == expected else None

    def read_unverified_piece(self, digest: Digest, index: int) -> bytes:
        """Read a piece of a blob still downloading (the caller holds its hash)."""
        return (self.blob_dir(digest) / str(index)).read_bytes()

    def touch(self, digest: Digest) -> None:
        """Record an access time for LRU order across restarts."""
        try:
            os.utime(self.blob_dir(digest))
        except OSError:
            pass

    def delete_blob(self, digest: Digest) -> None:
        """Remove a blob and all its pieces (complete or not)."""
        doomed = self.detach_blob(digest)
        if doomed is not None:
            self.remove_detached(doomed)

    def detach_blob(self, digest: Digest) -> Path | None:
        """Move a blob's directory out of the way (one rename); return where it went.

        From then on the blob is absent; :meth:`remove_detached` deletes the files.
        """
        self._trusted.pop(digest, None)
        doomed = self.tmp / f"{digest.hex}.{uuid.uuid4().hex}.del"
        try:
            os.replace(self.blob_dir(digest), doomed)
        except FileNotFoundError:
            return None
        return doomed

    def remove_detached(self, doomed: Path) -> None:
        """Delete a directory returned by :meth:`detach_blob`."""
        _remove(doomed)

    def write_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        """Cache a manifest fetched by digest (checked against it first)."""
        if hashlib.sha256(body).hexdigest() != digest.hex:
            raise DigestMismatch(f"manifest does not match {digest.short}")
        self._atomic_write(
            self.manifest_root / digest.hex,
            msgpack.packb({"media_type": media_type, "body": body}),
        )

    def read_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """A cached manifest and its media type, or ``None``; damaged entries are dropped."""
        path = self.manifest_root / digest.hex
        try:
            doc = msgpack.unpackb(path.read_bytes())
            media_type, body = str(doc["media_type"]), doc["body"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            path.unlink(missing_ok=True)
            return None
        if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != digest.hex:
            log.warning("cache: manifest %s damaged on disk, dropped", digest.short)
            path.unlink(missing_ok=True)
            return None
        return media_type, body


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
