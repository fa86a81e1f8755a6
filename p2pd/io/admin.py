"""The daemon's own endpoints on the mirror port, under ``/_p2pd/``: what the operator
commands (``p2pd status``, ``pull``, ``preheat``, ``doctor``) ask a node.

    GET  /_p2pd/status                               this node, its cache, peers, activity
    GET  /_p2pd/placement?digest=D&replicas=K        the K nodes a preheat puts D on
    POST /_p2pd/replicate?digest=D&size=N&to=ADDR    have member ADDR fetch D from peers;
                                                     answered when it holds D or gave up

Everything answers JSON; bad parameters get an OCI-style error document. The mirror port
listens on loopback in the shipped configuration, so only the node itself asks these.
Replicas are fetched from peers only: no registry credential ever leaves this node.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trio

from p2pd import __version__
from p2pd.config import DaemonConfig
from p2pd.core.digest import Digest
from p2pd.core.membership import Membership
from p2pd.core.messages import MAX_BLOB_SIZE
from p2pd.core.oci import error_body
from p2pd.errors import DigestInvalid, P2PError
from p2pd.io.blobs import BlobService
from p2pd.io.http import Request, ResponseWriter
from p2pd.io.mirror import Mirror
from p2pd.io.swarm import Swarm

JSON = ("Content-Type", "application/json")
MAX_REPLICAS = 64
LISTED = 200
"""Cached blobs listed by ``/_p2pd/status`` (the largest)."""


class BadParameter(Exception):
    """A query parameter of an admin request is missing or malformed."""


@dataclass
class Admin:
    """Answers ``/_p2pd/`` requests for one daemon (see the module docstring)."""

    config: DaemonConfig
    node_id: str
    mirror: Mirror
    blobs: BlobService
    swarm: Swarm | None = None
    membership: Membership | None = None
    peer_addr: str | None = None
    mirror_addr: str = ""
    started: float = 0.0

    async def handle(self, req: Request, resp: ResponseWriter) -> None:
        """Answer one ``/_p2pd/...`` request."""
        url = urlsplit(req.target)
        query = parse_qs(url.query, keep_blank_values=True)
        endpoints = {
            ("GET", "/_p2pd/status"): self._status,
            ("GET", "/_p2pd/placement"): self._placement,
            ("POST", "/_p2pd/replicate"): self._replicate,
        }
        endpoint = endpoints.get((req.method, url.path))
        if endpoint is None:
            known = url.path in {path for _, path in endpoints}
            await _send(resp, 405 if known else 404, _error(
                "UNSUPPORTED", f"{req.method} {url.path} is not an endpoint of p2pd"))
            return
        try:
            status, doc = await endpoint(query)
        except BadParameter as exc:
            status, doc = 400, _error("BAD_PARAMETER", str(exc))
        await _send(resp, status, doc)

    # -- status ---------------------------------------------------------------------

    async def _status(self, _query: dict[str, list[str]]) -> tuple[int, dict[str, object]]:
        writable = await trio.to_thread.run_sync(_writable, self.config.cache_dir)
        now = time.time()
        lru = self.blobs.lru
        doc: dict[str, object] = {
            "version": __version__,
            "node_id": self.node_id,
            "mirror": self.mirror_addr,
            "peer_addr": self.peer_addr,
            "uptime_seconds": round(trio.current_time() - self.started, 3),
            "registries": {host: r.endpoint for host, r in self.config.registries.items()},
            "default_registry": self.config.default_registry,
            "cache": {
                "dir": str(self.config.cache_dir),
                "limit_bytes": lru.capacity,
                "used_bytes": lru.total_bytes,
                "blobs": len(self.blobs.tables),
                "writable": writable is None,
                "error": writable,
                "largest": [{"digest": str(t.digest), "size": t.size} for t in sorted(
                    self.blobs.tables.values(), key=lambda t: -t.size)[:LISTED]],
            },
            "downloads": [
                {"digest": str(dl.digest), "size": dl.layout.size,
                 "peers": dl.bytes_by_source.get("peer", 0),
                 "upstream": dl.bytes_by_source.get("upstream", 0),
                 "seconds": round(now - dl.started_at, 3)}
                for dl in self.blobs.downloads.values()
            ],
            "members": self._members(),
        }
        doc.update(self.mirror.activity.to_json())
        return 200, doc

    def _members(self) -> list[dict[str, object]]:
        if self.membership is None:
            return []
        now = trio.current_time()
        found = []
        for member in self.membership.members():
            state = self.membership.status(member.node_id, now)
            found.append({"addr": member.addr, "state": state.name.lower() if state else "?",
                          "self": member.addr == self.peer_addr})
        return found

    # -- preheat --------------------------------------------------------------------

    def _needs_swarm(self) -> Swarm:
        if self.swarm is None:
            raise BadParameter("this daemon has no peers (start it with --peers) to preheat")
        return self.swarm

    async def _placement(self, query: dict[str, list[str]]) -> tuple[int, dict[str, object]]:
        swarm = self._needs_swarm()
        digest = _digest(query)
        replicas = _int(query, "replicas", 1, MAX_REPLICAS)
        nodes = swarm.placement(str(digest), replicas)
        return 200, {"digest": str(digest), "nodes": [
            {"addr": m.addr, "self": m.addr == swarm.addr} for m in nodes]}

    async def _replicate(self, query: dict[str, list[str]]) -> tuple[int, dict[str, object]]:
        swarm = self._needs_swarm()
        digest = _digest(query)
        size = _int(query, "size", 1, MAX_BLOB_SIZE)
        to = _one(query, "to")
        members = {m.addr for m in swarm.membership.members()}
        if to not in members:
            raise BadParameter(f"to={to[:80]!r} is not a member of this node's cluster")
        started = trio.current_time()
        try:
            if to == swarm.addr:
                reason = await self.blobs.replicate(str(digest), size)
            else:
                reason = await swarm.replicate_to(to, str(digest), size)
        except P2PError as exc:
            return 502, {"addr": to, "digest": str(digest), "reason": "unreachable",
                         "error": str(exc)}
        return 200, {"addr": to, "digest": str(digest), "reason": reason,
                     "seconds": round(trio.current_time() - started, 3)}


def _writable(directory: Path) -> str | None:
    """``None`` if the daemon can create a file in ``directory``, else why not."""
    try:
        fd, path = tempfile.mkstemp(dir=directory, prefix=".p2pd-probe.")
        os.close(fd)
        os.unlink(path)
    except OSError as exc:
        return str(exc)
    return None


def _one(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    if not values or len(values) != 1 or not values[0]:
        raise BadParameter(f"give exactly one {name}=")
    return values[0]


def _int(query: dict[str, list[str]], name: str, low: int, high: int) -> int:
    text = _one(query, name)
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadParameter(f"{name} must be a whole number in {low}..{high}")
    return int(text)


def _digest(query: dict[str, list[str]]) -> Digest:
    try:
        return Digest.parse(_one(query, "digest"))
    except DigestInvalid as exc:
        raise BadParameter(str(exc)) from exc


def _error(code: str, message: str) -> dict[str, object]:
    return json.loads(error_body(code, message))  # type: ignore[no-any-return]


async def _send(resp: ResponseWriter, status: int, doc: dict[str, object]) -> None:
    await resp.send(status, [JSON], json.dumps(doc).encode() + b"\n")
