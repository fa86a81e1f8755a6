"""What the mirror recently served, and where those bytes came from (for ``p2pd status``).

Every blob response is one :class:`Served`: the bytes sent to the client and how the
blob got here — already in the cache, or downloaded from peers and upstream. The bytes
that did not leave the registry for this node are the egress it saved. Manifest requests
are kept too, so ``p2pd doctor`` can see a request it provoked arrive.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

RECENT = 100
"""Blob responses and manifest requests remembered (the oldest go first)."""


@dataclass(frozen=True, slots=True)
class Served:
    """One blob response to a client.

    ``cache`` counts bytes sent from the complete cached blob; ``peers`` and ``upstream``
    are what the download behind the response fetched (zero for a cache hit).
    """

    at: float
    registry: str
    name: str
    digest: str
    size: int
    sent: int
    cache: int
    peers: int
    upstream: int


@dataclass(frozen=True, slots=True)
class ManifestSeen:
    """One manifest request and the status it was answered with."""

    at: float
    registry: str
    name: str
    reference: str
    method: str
    status: int


@dataclass(slots=True)
class Totals:
    """Sums over every blob response since the daemon started."""

    responses: int = 0
    sent: int = 0
    cache: int = 0
    peers: int = 0
    upstream: int = 0

    @property
    def egress_saved(self) -> int:
        """Bytes sent to clients that did not come from a registry."""
        return max(0, self.sent - self.upstream)


@dataclass(slots=True)
class Activity:
    """The recent blob responses and manifest requests, and the running totals."""

    served: deque[Served] = field(default_factory=lambda: deque(maxlen=RECENT))
    manifests: deque[ManifestSeen] = field(default_factory=lambda: deque(maxlen=RECENT))
    totals: Totals = field(default_factory=Totals)

    def blob(self, record: Served) -> None:
        """Record a finished blob response."""
        self.served.append(record)
        t = self.totals
        t.responses += 1
        t.sent += record.sent
        t.cache += record.cache
        t.peers += record.peers
        t.upstream += record.upstream

    def manifest(self, record: ManifestSeen) -> None:
        """Record an answered manifest request."""
        self.manifests.append(record)

    def to_json(self) -> dict[str, object]:
        """The JSON-ready form, newest first."""
        totals = asdict(self.totals)
        totals["egress_saved"] = self.totals.egress_saved
        return {
            "totals": totals,
            "recent": [asdict(r) | {"egress_saved": max(0, r.sent - r.upstream)}
                       for r in reversed(self.served)],
            "manifests": [asdict(m) for m in reversed(self.manifests)],
        }
