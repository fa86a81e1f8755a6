"""``p2pd preheat``: put an image's blobs on K nodes before a rollout.

1. The local daemon fetches every blob of the image (with the caller's credentials, as
   ``p2pd pull`` does, writing nothing): this node becomes a seed.
2. For each blob the daemon names its K placement nodes: the head of the blob's
   rendezvous order, the same order that picks the blob's coordinator, so the swarm
   finds the replicas the moment a rollout asks (``/_p2pd/placement``).
3. Each placement node is asked to fetch the blob from peers (``/_p2pd/replicate``, a
   ``REPLICATE`` on the peer port). Replicas never go to the registry and are handed no
   credentials: private bytes stay behind the mirror's per-client access check there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from p2pd.client.oci import Descriptor, Mirror
from p2pd.client.progress import Progress
from p2pd.client.pull import fetch_blobs

REPLICATIONS_AT_ONCE = 8
OK = ("held", "fetched")


@dataclass
class Preheated:
    """A preheat's outcome (also its ``--json`` form)."""

    image: str
    manifest: str
    replicas: int
    placements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The placements that did not end with the blob held."""
        return [p for p in self.placements if p["reason"] not in OK]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"image": self.image, "manifest": self.manifest, "replicas": self.replicas,
                "placements": self.placements, "failed": len(self.failed)}


def preheat(mirror: Mirror, replicas: int, seed_progress: Progress,
            spread_progress: Progress, timeout: float) -> Preheated:
    """Seed the image on this node, then replicate each blob to its placement nodes."""
    image = mirror.resolve()
    result = Preheated(str(image.ref), image.manifest.digest, replicas)
    seed_progress.start(f"seed {image.ref}", sum(d.size for d in image.blobs))
    fetch_blobs(mirror, image.blobs, None, seed_progress, lambda desc, seconds: None)
    seed_progress.finish()

    jobs: list[tuple[Descriptor, dict[str, Any]]] = []
    for desc in image.blobs:
        placement = mirror.admin("GET", "placement", digest=desc.digest, replicas=replicas)
        jobs += [(desc, node) for node in placement["nodes"]]
    spread_progress.start(f"replicate to {replicas} nodes", len(jobs))

    def one(job: tuple[Descriptor, dict[str, Any]]) -> dict[str, Any]:
        desc, node = job
        answer = mirror.admin("POST", "replicate", timeout=timeout, digest=desc.digest,
                              size=desc.size, to=node["addr"])
        spread_progress.advance(1)
        return {"digest": desc.digest, "size": desc.size, "node": node["addr"],
                "self": node["self"], "reason": answer.get("reason", "?"),
                "seconds": answer.get("seconds"), "error": answer.get("error")}

    with ThreadPoolExecutor(REPLICATIONS_AT_ONCE) as pool:
        result.placements = list(pool.map(one, jobs))
    spread_progress.finish()
    return result
