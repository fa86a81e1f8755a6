"""``p2pd pull``: fetch an image's blobs through the local daemon (like ``dfget``), verify
them, and write them as an OCI image layout.

The daemon does the work (peers first, the registry for the rest); this command is its
client, as containerd is. Where the bytes came from is read back from the daemon's
``/_p2pd/status`` while the pull runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pd.client.oci import ClientError, Descriptor, Image, Mirror
from p2pd.client.progress import Progress
from p2pd.client.progress import human_size as _size

LAYERS_AT_ONCE = 3
"""Blobs fetched side by side (containerd's default too)."""


@dataclass
class Sources:
    """Bytes of this pull's blobs by where the daemon got them."""

    cache: int = 0
    peers: int = 0
    upstream: int = 0

    def as_dict(self) -> dict[str, int]:
        """The JSON form."""
        return {"cache": self.cache, "peers": self.peers, "upstream": self.upstream}

    def text(self) -> str:
        """One line for people."""
        return (f"peers {_size(self.peers)} · upstream {_size(self.upstream)} · "
                f"cache {_size(self.cache)}")


def sources(status: dict[str, Any], digests: set[str], since: float) -> Sources:
    """Where the daemon got ``digests`` for responses since ``since`` (wall clock),
    counting downloads still running."""
    found = Sources()
    for record in status.get("recent", []):
        if record.get("digest") in digests and record.get("at", 0) >= since:
            found.cache += record.get("cache", 0)
            found.peers += record.get("peers", 0)
            found.upstream += record.get("upstream", 0)
    for dl in status.get("downloads", []):
        if dl.get("digest") in digests:
            found.peers += dl.get("peers", 0)
            found.upstream += dl.get("upstream", 0)
    return found


@dataclass
class Fetched:
    """A pull's outcome (also its ``--json`` form)."""

    image: str
    manifest: str
    output: str | None
    blobs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    sources: Sources = field(default_factory=Sources)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"image": self.image, "manifest": self.manifest, "output": self.output,
                "blobs": self.blobs, "bytes": sum(b["size"] for b in self.blobs),
                "seconds": round(self.seconds, 3), "from": self.sources.as_dict()}


def fetch_blobs(mirror: Mirror, blobs: tuple[Descriptor, ...], out_dir: Path | None,
                progress: Progress, on_done: Callable[[Descriptor, float], None]) -> None:
    """Fetch ``blobs`` through the daemon, ``LAYERS_AT_ONCE`` at a time, verified; keep
    them in ``out_dir/blobs/sha256`` if given."""
    def one(desc: Descriptor) -> None:
        started = time.monotonic()
        target = out_dir / "blobs" / "sha256" / desc.digest[7:] if out_dir else None
        if target is not None and _verified(target, desc):
            progress.advance(desc.size)
            on_done(desc, 0.0)
            return
        if target is None:
            mirror.blob(desc, lambda chunk: progress.advance(len(chunk)))
        else:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial.")
            try:
                with os.fdopen(fd, "wb") as f:
                    def write(chunk: bytes) -> None:
                        f.write(chunk)
                        progress.advance(len(chunk))
                    mirror.blob(desc, write)
                os.replace(tmp, target)
            except BaseException:
                os.unlink(tmp)
                raise
        on_done(desc, time.monotonic() - started)

    if out_dir is not None:
        (out_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(LAYERS_AT_ONCE) as pool:
        for future in [pool.submit(one, desc) for desc in blobs]:
            future.result()


def pull(mirror: Mirror, out_dir: Path | None, progress: Progress) -> Fetched:
    """Resolve the image, fetch every blob through the daemon, write the layout."""
    started_wall, started = time.time(), time.monotonic()
    image = mirror.resolve()
    result = Fetched(str(image.ref), image.manifest.digest,
                     str(out_dir) if out_dir else None)
    digests = {d.digest for d in image.blobs}
    progress.start(f"pull {image.ref}", sum(d.size for d in image.blobs))
    lock = threading.Lock()

    def done(desc: Descriptor, seconds: float) -> None:
        with lock:
            result.blobs.append({"digest": desc.digest, "size": desc.size,
                                 "media_type": desc.media_type, "seconds": round(seconds, 3)})

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                found = sources(mirror.admin("GET", "status"), digests, started_wall)
            except ClientError:
                continue
            progress.note(found.text())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fetch_blobs(mirror, image.blobs, out_dir, progress, done)
    finally:
        stop.set()
        watcher.join()
    result.sources = sources(mirror.admin("GET", "status"), digests, started_wall)
    progress.note(result.sources.text())
    progress.finish()
    if out_dir is not None:
        write_layout(out_dir, image)
    result.seconds = time.monotonic() - started
    return result


def write_layout(out_dir: Path, image: Image) -> None:
    """Write the manifest, ``index.json`` and ``oci-layout`` (the blobs are there)."""
    blobs = out_dir / "blobs" / "sha256"
    (blobs / image.manifest.digest[7:]).write_bytes(image.manifest_bytes)
    entry: dict[str, Any] = {"mediaType": image.manifest.media_type,
                             "digest": image.manifest.digest, "size": image.manifest.size}
    if image.ref.tag:
        entry["annotations"] = {"org.opencontainers.image.ref.name": image.ref.tag}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [entry]}
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')


def _verified(path: Path, desc: Descriptor) -> bool:
    """Whether ``path`` already holds exactly ``desc`` (a pull into the same directory
    again skips what it has)."""
    try:
        if path.stat().st_size != desc.size:
            return False
        with path.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == desc.digest
    except OSError:
        return False
