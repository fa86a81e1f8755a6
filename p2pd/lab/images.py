"""Build deterministic OCI images in pure Python and push them with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

log = logging.getLogger(__name__)

SKOPEO_BIN = "skopeo"

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: digest (``sha256:<hex>``), size in bytes, media type."""

    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        """The OCI descriptor for this blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """An OCI image layout on disk and the descriptors of its contents."""

    layout_dir: Path
    tag: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def layer_bytes(self) -> int:
        """Sum of compressed layer sizes."""
        return sum(layer.size for layer in self.layers)

    @property
    def blob_bytes(self) -> int:
        """Sum of config and layer sizes (everything except the manifest)."""
        return self.config.size + self.layer_bytes

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Config followed by layers."""
        return (self.config, *self.layers)

    def blob_path(self, digest: str) -> Path:
        """Path of a blob inside the layout."""
        algo, _, hexdigest = digest.partition(":")
        return self.layout_dir / "blobs" / algo / hexdigest


@dataclass(frozen=True)
class PushedImage:
    """An image pushed to a registry: the image, registry host, repository, tag, reference."""

    image: Image
    registry_host: str
    repo: str
    tag: str

    @property
    def ref(self) -> str:
        """``HOST/REPO:TAG``."""
        return f"{self.registry_host}/{self.repo}:{self.tag}"


def goarch() -> str:
    """The Go architecture name of this machine (``amd64``, ``arm64``, ...)."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine or "amd64")


class _Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


class _HashingWriter(io.RawIOBase):
    """Write-through binary sink that computes sha256 and counts bytes."""

    def __init__(self, sink: _Sink):
        super().__init__()
        self.sink = sink
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.sink.write(view)
        self.count += len(view)
        return len(view)


def _tar_header(name: str, *, size: int, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
        info.size = size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _write_tar(out: _Sink, index: int, size: int, seed: int) -> None:
    """Stream a tar with ``layer{index}/data.bin`` of ``size`` random bytes to ``out``."""
    written = 0
    for chunk in (
        _tar_header(f"layer{index}/", size=0, is_dir=True),
        _tar_header(f"layer{index}/data.bin", size=size, is_dir=False),
    ):
        out.write(chunk)
        written += len(chunk)
    rng = random.Random(seed + index)
    left = size
    while left > 0:
        n = min(left, _CHUNK)
        out.write(rng.randbytes(n))
        left -= n
    written += size
    pad = (-size) % tarfile.BLOCKSIZE
    out.write(b"\0" * pad)
    written += pad
    # End-of-archive marker, padded to a full record like tarfile does.
    trailer = 2 * tarfile.BLOCKSIZE
    trailer += (-(written + trailer)) % tarfile.RECORDSIZE
    out.write(b"\0" * trailer)


def _store_blob(blobs_dir: Path, tmp: Path, digest_hex: str) -> None:
    dest = blobs_dir / digest_hex
    if dest.exists():
        tmp.unlink()
    else:
        os.replace(tmp, dest)


def _write_json_blob(blobs_dir: Path, obj: dict[str, Any], media_type: str) -> Blob:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    hexdigest = hashlib.sha256(data).hexdigest()
    (blobs_dir / hexdigest).write_bytes(data)
    return Blob(f"sha256:{hexdigest}", len(data), media_type)


def _write_layer(
    blobs_dir: Path, index: int, size: int, seed: int, compresslevel: int
) -> tuple[Blob, str]:
    """Write one gzip'd tar layer; return its blob and the diff_id of the plain tar."""
    fd, tmp_name = tempfile.mkstemp(prefix=".layer-", dir=blobs_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingWriter(raw)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, compresslevel=compresslevel, mtime=0
            ) as gz:
                uncompressed = _HashingWriter(gz)
                _write_tar(uncompressed, index, size, seed)
        blob_hex = compressed.sha.hexdigest()
        _store_blob(blobs_dir, tmp, blob_hex)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    blob = Blob(f"sha256:{blob_hex}", compressed.count, MT_OCI_LAYER_GZIP)
    return blob, f"sha256:{uncompressed.sha.hexdigest()}"


def build_image(
    layout_dir: Path,
    layer_sizes: Sequence[int],
    *,
    seed: int = 0,
    tag: str = "latest",
    compresslevel: int = 0,
) -> Image:
    """Write a deterministic single-platform OCI image layout into ``layout_dir``.

    Layer ``i`` is a gzip'd tar holding ``layer{i}/data.bin`` with ``layer_sizes[i]``
    random bytes from ``random.Random(seed + i)``; the data is incompressible so the
    layer blob is slightly larger than the requested size. Layers are streamed to
    disk, so large sizes do not need much memory. ``compresslevel`` 0 (stored deflate
    blocks, still valid gzip) is much faster than 1 for random data.
    """
    blobs_dir = layout_dir / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        blob, diff_id = _write_layer(blobs_dir, i, size, seed, compresslevel)
        layers.append(blob)
        diff_ids.append(diff_id)
    config_obj: dict[str, Any] = {
        "architecture": goarch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"p2pd lab layer {i} seed {seed}"} for i in range(len(layers))],
    }
    config = _write_json_blob(blobs_dir, config_obj, MT_OCI_CONFIG)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    manifest = _write_json_blob(blobs_dir, manifest_obj, MT_OCI_MANIFEST)
    index_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [
            {
                **manifest.descriptor(),
                "annotations": {REF_NAME_ANNOTATION: tag},
                "platform": {"architecture": goarch(), "os": "linux"},
            }
        ],
    }
    (layout_dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout_dir / "index.json").write_text(json.dumps(index_obj, indent=2))
    image = Image(layout_dir, tag, manifest, config, tuple(layers))
    log.info(
        "built image %s:%s (%d layers, %d bytes) manifest %s",
        layout_dir,
        tag,
        len(layers),
        image.blob_bytes,
        manifest.digest,
    )
    return image


def manifest_digest(
    registry_host: str,
    repo: str,
    reference: str,
    *,
    creds: tuple[str, str] | None = None,
    accept: str = MT_OCI_MANIFEST,
) -> str:
    """HEAD a manifest over plain HTTP and return its ``Docker-Content-Digest``."""
    resp = httpx.head(
        f"http://{registry_host}/v2/{repo}/manifests/{reference}",
        headers={"Accept": accept},
        auth=creds,
        timeout=10.0,
        trust_env=False,
    )
    resp.raise_for_status()
    return resp.headers["Docker-Content-Digest"]


def push_image(
    image: Image,
    registry_host: str,
    repo: str,
    *,
    creds: tuple[str, str] | None = None,
    tag: str | None = None,
    timeout: float = 300.0,
) -> str:
    """Copy ``image`` byte for byte to ``registry_host/repo:tag`` with skopeo.

    Blobs are copied as-is (``--preserve-digests``), so the manifest digest in the
    registry equals ``image.manifest.digest``; this is verified after the push.
    Returns the reference ``HOST/REPO:TAG``.
    """
    tag = tag or image.tag
    ref = f"{registry_host}/{repo}:{tag}"
    args = [
        SKOPEO_BIN,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]
    if creds is not None:
        args.append(f"--dest-creds={creds[0]}:{creds[1]}")
    else:
        args.append("--dest-no-creds")
    args += [f"oci:{image.layout_dir}:{image.tag}", f"docker://{ref}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"skopeo copy to {ref} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    got = manifest_digest(registry_host, repo, tag, creds=creds)
    if got != image.manifest.digest:
        raise RuntimeError(
            f"registry manifest digest {got} != built manifest {image.manifest.digest} for {ref}"
        )
    log.info("pushed %s (%s)", ref, got)
    return ref


def remove_layout(image: Image) -> None:
    """Delete an image layout directory."""
    shutil.rmtree(image.layout_dir, ignore_errors=True)
