"""The OCI pull API that containerd talks to (the mirror port).

Requests are validated by ``p2pd.core.oci`` first: a malformed name, digest, tag, ``ns``
or ``Range`` is refused with an OCI error and touches neither the cache nor upstream.
Tags always go upstream. A blob or a by-digest manifest is served from local bytes only
to a client that upstream has recently let read that repository (checked with a ``HEAD``
carrying the client's own ``Authorization``); upstream's 401 and its ``WWW-Authenticate``
are relayed unchanged, so containerd runs its own token flow. When p2pd cannot serve, it
answers 5xx so containerd falls back to the registry itself (``server`` in hosts.toml).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from urllib.parse import urlsplit

import httpx
import trio

from p2pd.config import DaemonConfig
from p2pd.core.activity import Activity, ManifestSeen, Served
from p2pd.core.digest import Digest
from p2pd.core.oci import AccessGrants, Route, error_body, error_for, parse_target
from p2pd.core.pieces import PieceLayout
from p2pd.core.ranges import ByteRange, parse_range
from p2pd.errors import CorruptPiece, InvalidRequest, RangeNotSatisfiable, UpstreamError
from p2pd.io.blobs import BlobService
from p2pd.io.download import Download, DownloadFailed, Pending
from p2pd.io.http import Handler, Request, ResponseAborted, ResponseWriter
from p2pd.io.metrics import Metrics
from p2pd.io.store import FileRegion
from p2pd.io.upstream import Upstreams, forwardable

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 << 20
JSON = ("Content-Type", "application/json")
API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")
RELAYED = ("content-type", "docker-content-digest", "www-authenticate", "etag",
           "docker-distribution-api-version", "retry-after")
ACCESS_KINDS = {"blob": "blobs", "manifest": "manifests"}


class Refused(Exception):
    """Upstream did not let the client read; the answer has been relayed already."""


class Mirror:
    """Handles one HTTP request of the mirror port (see the module docstring)."""

    def __init__(
        self,
        config: DaemonConfig,
        blobs: BlobService,
        upstreams: Upstreams,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.blobs = blobs
        self.upstreams = upstreams
        self.metrics = metrics
        self.grants = AccessGrants(config.access_ttl)
        self.activity = Activity()
        self.admin: Handler | None = None
        """Answers ``/_p2pd/...`` (the operator commands' endpoints), set by the daemon."""
        self.ready = False

    async def handle(self, req: Request, resp: ResponseWriter) -> None:
        """Answer one request."""
        path = urlsplit(req.target).path
        if path == "/healthz":
            status = 200 if self.ready else 503
            await resp.send(status, [("Content-Type", "text/plain")],
                            b"ok\n" if self.ready else b"starting\n")
            return
        if path == "/metrics":
            await resp.send(200, [("Content-Type", self.metrics.content_type)],
                            self.metrics.render())
            return
        if path.startswith("/_p2pd/") and self.admin is not None:
            await self.admin(req, resp)
            return
        if req.method not in ("GET", "HEAD"):
            await _error(resp, 405, "UNSUPPORTED", "p2pd is a pull-only mirror")
            return
        try:
            route = parse_target(req.target)
        except InvalidRequest as exc:
            log.info("refused %s %s: %s", req.method, req.target[:120], exc.message)
            status, body = error_for(exc)
            await resp.send(status, [JSON, API_VERSION], body)
            return
        registry = route.registry or self.config.default_registry
        try:
            if route.kind == "blob":
                await self._blob(req, resp, registry, route)
            elif route.kind == "manifest":
                try:
                    await self._manifest(req, resp, registry, route)
                finally:
                    self.activity.manifest(ManifestSeen(
                        time.time(), registry, route.name, str(route.reference), req.method,
                        resp.status or 0))
            else:
                await self._base(req, resp, registry)
        except Refused:
            return
        except UpstreamError as exc:
            log.warning("%s %s: upstream %s unavailable: %s", req.method, req.target[:120],
                        registry, exc)
            if resp.started:
                raise ResponseAborted(str(exc)) from exc
            await _error(resp, 503, "UNAVAILABLE", f"upstream {registry} unavailable")

    # -- access ---------------------------------------------------------------------

    def _grant_key(self, req: Request, registry: str, name: str) -> tuple[str, str, str]:
        auth = req.header("authorization") or ""
        return registry, name, hashlib.sha256(auth.encode()).hexdigest()

    async def _relay(
        self, req: Request, resp: ResponseWriter, upstream: httpx.Response, body: bytes
    ) -> None:
        headers = [(k, v) for k, v in upstream.headers.multi_items() if k.lower() in RELAYED]
        if req.method == "HEAD" or body:
            length = upstream.headers.get("content-length")
            await resp.send(upstream.status_code, headers, body,
                            length=int(length) if req.method == "HEAD" and length else None)
            return
        code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN",
                429: "TOOMANYREQUESTS"}.get(upstream.status_code, "UNAVAILABLE")
        headers = [h for h in headers if h[0].lower() != "content-type"] + [JSON]
        await resp.send(upstream.status_code, headers,
                        error_body(code, f"upstream answered {upstream.status_code}"))

    async def _check_access(
        self, req: Request, resp: ResponseWriter, registry: str, route: Route
    ) -> int | None:
        """Make sure upstream lets this client read ``route``; return upstream's size.

        Returns ``None`` when a recent grant made asking unnecessary. Raises
        :class:`Refused` after relaying upstream's refusal.
        """
        key = self._grant_key(req, registry, route.name)
        if self.grants.allowed(key, trio.current_time()):
            return None
        path = f"/v2/{route.name}/{ACCESS_KINDS[route.kind]}/{route.reference}"
        upstream = await self.upstreams.send(
            registry, "HEAD", path, forwardable(req.headers), kind=route.kind
        )
        await upstream.aclose()
        if upstream.status_code != 200:
            self.grants.revoke(key)
            if upstream.status_code >= 500:
                raise UpstreamError(f"HEAD {path} answered {upstream.status_code}")
            await self._relay(req, resp, upstream, b"")
            raise Refused
        self.grants.grant(key, trio.current_time())
        length = upstream.headers.get("content-length")
        return int(length) if length and length.isdigit() else None

    # -- /v2/ -----------------------------------------------------------------------

    async def _base(self, req: Request, resp: ResponseWriter, registry: str) -> None:
        upstream = await self.upstreams.send(
            registry, req.method, "/v2/", forwardable(req.headers), kind="base"
        )
        body = await _read_bounded(upstream, MAX_MANIFEST)
        if upstream.status_code >= 500:
            raise UpstreamError(f"/v2/ answered {upstream.status_code}")
        await self._relay(req, resp, upstream, body)

    # -- manifests ------------------------------------------------------------------

    async def _manifest(
        self, req: Request, resp: ResponseWriter, registry: str, route: Route
    ) -> None:
        digest = route.digest
        key = self._grant_key(req, registry, route.name)
        if digest is not None and self.grants.allowed(key, trio.current_time()):
            cached = await trio.to_thread.run_sync(self.blobs.store.read_manifest, digest)
            if cached is not None:
                media_type, body = cached
                await self._send_manifest(req, resp, digest, media_type, body, "cache")
                return
        path = f"/v2/{route.name}/manifests/{route.reference}"
        upstream = await self.upstreams.send(
            registry, req.method, path, forwardable(req.headers), kind="manifest"
        )
        body = await _read_bounded(upstream, MAX_MANIFEST)
        if upstream.status_code >= 500:
            raise UpstreamError(f"manifest {route.reference} answered {upstream.status_code}")
        if upstream.status_code != 200 or req.method == "HEAD":
            if upstream.status_code == 200:
                self.grants.grant(key, trio.current_time())
            self.metrics.manifest_requests.labels(req.method, str(upstream.status_code)).inc()
            await self._relay(req, resp, upstream, body)
            return
        actual = Digest(hashlib.sha256(body).hexdigest())
        if digest is not None and actual != digest:
            raise UpstreamError(f"manifest {digest.short} from upstream hashes to {actual.short}")
        self.grants.grant(key, trio.current_time())
        media_type = upstream.headers.get("content-type", "application/octet-stream")
        await trio.to_thread.run_sync(self.blobs.store.write_manifest, actual, media_type, body)
        await self._send_manifest(req, resp, actual, media_type, body, "upstream")

    async def _send_manifest(
        self, req: Request, resp: ResponseWriter, digest: Digest, media_type: str,
        body: bytes, source: str,
    ) -> None:
        self.metrics.manifest_requests.labels(req.method, "200").inc()
        headers = [("Content-Type", media_type), ("Docker-Content-Digest", str(digest)),
                   API_VERSION]
        log.debug("manifest %s (%d bytes) from %s", digest.short, len(body), source)
        if req.method == "HEAD":
            await resp.send(200, headers, length=len(body))
        else:
            await resp.send(200, headers, body)

    # -- blobs ----------------------------------------------------------------------

    async def _blob(self, req: Request, resp: ResponseWriter, registry: str, route: Route) -> None:
        digest = route.digest
        assert digest is not None
        upstream_size = await self._check_access(req, resp, registry, route)
        table = self.blobs.complete(digest)
        size = table.size if table is not None else upstream_size
        if size is None:
            # A grant without a cached blob, or upstream without a length: ask again.
            self.grants.revoke(self._grant_key(req, registry, route.name))
            size = await self._check_access(req, resp, registry, route)
            if size is None:
                raise UpstreamError(f"upstream gave no length for blob {digest.short}")
        try:
            rng = parse_range(req.header("range"), size)
        except RangeNotSatisfiable as exc:
            self.metrics.blob_requests.labels(req.method, "416").inc()
            await resp.send(416, [JSON, ("Content-Range", f"bytes */{exc.size}")],
                            error_body(exc.code, exc.message))
            return
        except InvalidRequest as exc:
            status, body = error_for(exc)
            await resp.send(status, [JSON], body)
            return
        status = 200 if rng.is_whole else 206
        headers = [("Content-Type", "application/octet-stream"),
                   ("Docker-Content-Digest", str(digest)), ("Accept-Ranges", "bytes"),
                   ("Content-Length", str(rng.length)), API_VERSION]
        if status == 206:
            headers.append(("Content-Range", rng.content_range()))
        self.metrics.blob_requests.labels(req.method, str(status)).inc()
        if req.method == "HEAD":
            await resp.start(status, headers)
            await resp.finish()
            return
        await self._stream_blob(req, resp, registry, route, rng, status, headers)

    async def _stream_blob(
        self, req: Request, resp: ResponseWriter, registry: str, route: Route,
        rng: ByteRange, status: int, headers: list[tuple[str, str]],
    ) -> None:
        digest = route.digest
        assert digest is not None
        started = trio.current_time()
        self.blobs.lru.pin(digest)
        try:
            dl: Download | None = None
            first: bytes | FileRegion | None = None
            table = self.blobs.complete(digest)
            if table is not None:
                layout = table.layout
                pieces = layout.pieces_for(rng.start, rng.stop)
                try:
                    first = await self.blobs.read_piece(digest, pieces[0], None) \
                        if pieces else b""
                except CorruptPiece as exc:
                    log.warning("blob %s: %s; fetching it again", digest.short, exc)
            if first is None:
                self.metrics.cache_misses.inc()
                dl = self.blobs.download(registry, route.name, digest, rng.size,
                                         forwardable(req.headers))
                layout = dl.layout
                pieces = layout.pieces_for(rng.start, rng.stop)
                source = "download"
            else:
                self.metrics.cache_hits.inc()
                self.blobs.touch(digest)
                source = "cache"
            try:
                sent = await self._send_pieces(resp, digest, dl, layout, pieces, rng, first,
                                               status, headers, source)
            except (CorruptPiece, DownloadFailed) as exc:
                self.metrics.aborted_responses.inc()
                if not resp.started:
                    log.warning("blob %s: cannot serve: %s", digest.short, exc)
                    await _error(resp, 503, "UNAVAILABLE", "blob could not be verified")
                    return
                raise ResponseAborted(f"blob {digest.short}: {exc}") from exc
            elapsed = trio.current_time() - started
            origin = ",".join(sorted(dl.bytes_by_source)) or "download" if dl else "cache"
            log.info("blob %s %s bytes=%d from=%s in %.3fs client=%s", digest.short,
                     "whole" if rng.is_whole else rng.content_range(), sent, origin, elapsed,
                     req.client)
            self.metrics.blob_duration.labels(source).observe(elapsed)
            fetched: dict[str, int] = {}
            if dl is not None and not dl.accounted:  # a download's bytes count once
                fetched, dl.accounted = dl.bytes_by_source, True
            self.activity.blob(Served(
                time.time(), registry, route.name, str(digest), layout.size, sent,
                sent if dl is None else 0, fetched.get("peer", 0), fetched.get("upstream", 0)))
        finally:
            self.blobs.lru.unpin(digest)

    async def _send_pieces(
        self, resp: ResponseWriter, digest: Digest, dl: Download | None,
        layout: PieceLayout, pieces: range, rng: ByteRange,
        first: bytes | FileRegion | None, status: int, headers: list[tuple[str, str]],
        source: str,
    ) -> int:
        """Stream ``pieces``, reading the next while sending this one; return bytes sent.

        The head goes out only once the first piece is in hand, so a first piece that
        cannot be had turns into an error status instead of a cut-off body.
        """
        served = self.metrics.blob_bytes_served.labels(source)
        sent = 0
        pending: Pending | None = None
        part: bytes | FileRegion | None = first
        try:
            for n, index in enumerate(pieces):
                if part is None and pending is not None:
                    part, pending = await pending.result(), None
                elif part is None:
                    part = await self.blobs.read_piece(digest, index, dl)
                if n + 1 < len(pieces):
                    pending = self.blobs.prefetch(
                        functools.partial(self.blobs.read_piece, digest, pieces[n + 1], dl))
                if n == 0:
                    await resp.start(status, headers)
                start, stop = layout.span(index)
                lo, hi = max(rng.start, start) - start, min(rng.stop, stop) - start
                if isinstance(part, FileRegion):
                    try:
                        await resp.write_file(part.fd, lo, hi - lo)
                    finally:
                        part.close()
                else:
                    await resp.write(part if (lo, hi) == (0, len(part))
                                     else memoryview(part)[lo:hi])
                part = None
                sent += hi - lo
                served.inc(hi - lo)
            if not pieces:
                await resp.start(status, headers)
            await resp.finish()
        finally:
            if isinstance(part, FileRegion):
                part.close()
            if pending is not None:
                pending.discard()
        return sent


async def _read_bounded(upstream: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    try:
        async for chunk in upstream.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise UpstreamError(f"upstream answer is larger than {limit} bytes")
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream answer broke: {exc!r}") from exc
    finally:
        await upstream.aclose()
    return bytes(body)


async def _error(resp: ResponseWriter, status: int, code: str, message: str) -> None:
    await resp.send(status, [JSON, API_VERSION], error_body(code, message))
