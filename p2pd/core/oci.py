"""The OCI distribution pull API as plain values: routes, error bodies, access grants.

``parse_target`` turns a request target into a :class:`Route` (or raises the OCI error
to answer with); nothing here performs I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from p2pd.core.digest import Digest
from p2pd.core.names import is_tag, validate_name, validate_registry_host
from p2pd.errors import InvalidRequest, NotFound, ReferenceInvalid

MAX_TARGET = 4096
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True, slots=True)
class Route:
    """A request of the pull API.

    ``kind`` is ``base`` (``/v2/``), ``manifest`` or ``blob``. ``registry`` is the
    ``ns`` query parameter (the registry host the client meant), or ``None``.
    For manifests ``reference`` is a tag or a :class:`Digest`; for blobs a :class:`Digest`.
    """

    kind: Literal["base", "manifest", "blob"]
    registry: str | None
    name: str = ""
    reference: str | Digest = ""

    @property
    def digest(self) -> Digest | None:
        """The digest the route asks for, if it names content by digest."""
        return self.reference if isinstance(self.reference, Digest) else None


def parse_target(target: str) -> Route:
    """Parse an HTTP request target of the pull API.

    Raises :class:`NotFound` for paths outside the API and the matching
    :class:`InvalidRequest` subclass for malformed names, digests, tags or ``ns``.
    """
    if len(target) > MAX_TARGET:
        raise NotFound("request target is too long")
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    registry = None
    if "ns" in query:
        registry = validate_registry_host(query["ns"][-1])
    path = unquote(parts.path)
    if path in ("/v2", "/v2/"):
        return Route("base", registry)
    if not path.startswith("/v2/"):
        raise NotFound(f"{path[:80]!r} is not part of the registry API")
    rest = path[len("/v2/"):]
    # The last "/blobs/" or "/manifests/" splits name from reference: a repository may
    # itself have a component called "blobs" or "manifests".
    at, kind = max((rest.rfind("/blobs/"), "blobs"), (rest.rfind("/manifests/"), "manifests"))
    if at > 0:
        name, reference = rest[:at], rest[at + len(kind) + 2:]
        validate_name(name)
        if kind == "blobs":
            return Route("blob", registry, name, Digest.parse(reference))
        if ":" in reference:
            return Route("manifest", registry, name, Digest.parse(reference))
        if not is_tag(reference):
            raise ReferenceInvalid(f"manifest reference {reference[:80]!r} is malformed")
        return Route("manifest", registry, name, reference)
    raise NotFound(f"{path[:80]!r} is not part of the pull API")


def error_body(code: str, message: str) -> bytes:
    """An OCI error document: ``{"errors":[{"code":…,"message":…}]}``."""
    doc = {"errors": [{"code": code, "message": message, "detail": None}]}
    return json.dumps(doc).encode()


def error_for(exc: InvalidRequest) -> tuple[int, bytes]:
    """Status and body to answer a rejected request with."""
    return exc.status, error_body(exc.code, exc.message)


class AccessGrants:
    """Remembers, for a while, that a client may read a repository.

    Cached or peer-held bytes of a repository may only go to a client that upstream has
    recently let read it; keys combine registry, repository and a hash of the client's
    ``Authorization`` header. Time is passed in.
    """

    def __init__(self, ttl: float, *, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, str, str], float] = {}

    def allowed(self, key: tuple[str, str, str], now: float) -> bool:
        """Whether a grant for ``key`` is still valid at ``now``."""
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[key]
            return False
        return True

    def grant(self, key: tuple[str, str, str], now: float) -> None:
        """Record that upstream let ``key`` read at ``now``."""
        if len(self._expiry) >= self.max_entries:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            if len(self._expiry) >= self.max_entries:
                self._expiry.clear()
        self._expiry[key] = now + self.ttl

    def revoke(self, key: tuple[str, str, str]) -> None:
        """Forget a grant (upstream said no)."""
        self._expiry.pop(key, None)
