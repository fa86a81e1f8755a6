"""The swarm's timings and limits, in one place for the daemon and the simulation.

``p2pd/io/swarm.py`` and ``p2pd/io/peer.py`` run with them; ``simulations/node.py``
simulates the same daemon and must not import trio, so both read them from here.
Seconds and counts.
"""

from __future__ import annotations

import random

LOOKUP_INTERVAL = 0.25
"""How often a download asks its blob's coordinator who holds which pieces (on average:
see :data:`LOOKUP_JITTER`)."""
LOOKUP_JITTER = 0.5
"""Each wait between lookups is drawn from ``LOOKUP_INTERVAL x (1 ± LOOKUP_JITTER)``.
Nodes that start a pull together would otherwise look up in step: all learn of a new
piece at the same instant and all ask its one holder for it, which serves
:data:`MAX_UPLOADS`, queues :data:`MAX_WAITING` and refuses the rest as busy. Simulated,
1,000 nodes pulling 1 GB at once on 10 Gbit/s links: busy refusals 1.21 M → 0.35 M and
p50 3.11 → 2.69 s with ±50 % (the same with ±100 %)."""
LEASE_RETRY = 1.0
"""How often a download asks for the upstream lease while pieces nobody holds are wanted."""
ANNOUNCE_DELAY = 0.1
"""Newly stored pieces are announced to the coordinator within this long (batched)."""
REANNOUNCE = 20.0
"""Complete blobs are announced again this often (the coordinator's state is soft)."""
HOLDER_TTL = 3 * REANNOUNCE
LEASE_DEFER = LOOKUP_INTERVAL
"""A node asks for one upstream lease at a time, and while it fetches a blob from
upstream it waits this long before asking for another blob's (unless no other daemon is
alive). When nodes start a pull together the others take those leases meanwhile, so the
first copies come through several nodes' downlinks instead of all through the first
asker's (emulated, 4 nodes on 4 MiB/s links: the node that asked first took all four
layers' leases and the pull took 39 s; 21.7 s with them spread). A node pulling alone
in a cluster gets each further lease this much later."""
LEASE_TTL = 5.0
STUCK_AFTER = LEASE_TTL + 1.0
"""Pieces no usable peer has and nobody fetches for this long come from upstream anyway
(unless pieces are still on their way from peers: a slow peer is not a missing one; the
scheduler's request timeout takes care of peers that stop answering). "This long" is
since a piece last arrived here, or a lookup was first answered (or the first went
unanswered for :data:`LOOKUP_TIMEOUT`), showed a piece held that none had shown before,
or showed someone fetching upstream (a live lease): a swarm
that makes progress is not stuck, only slow to reach us (at thousands of nodes the
coordinator's first answers alone take seconds)."""
GONE_RETRY = 5.0
"""A peer that could not be reached is not asked for pieces for this long, whatever
lookups say (its coordinator counts it as a holder until membership finds it down)."""
MISSING_RETRY = 2.0
"""A peer that refused a piece it announced is asked for it again after this long (it
may have been about to publish it; or the coordinator's view of it is stale)."""
RPC_TIMEOUT = 3.0
"""A coordinator that has not answered a lookup or lease request by then counts as
unreachable: the download goes on without it (solo: upstream for what no known peer has)."""
SAMPLE_ABOVE = 64
"""A blob's coordinator with more askers than this answers lookups with holders drawn at
random instead of choosing for each asker (see ``p2pd.core.coordinator``)."""
LOOKUP_TIMEOUT = 6.0
"""How long a lookup may wait for its answer (then the coordinator is taken as hung: the
download goes on with the peers it knows, and :data:`STUCK_AFTER` later upstream). Longer
than :data:`RPC_TIMEOUT`: a coordinator that thousands of nodes look up at once takes
seconds to answer each, and giving up on a lookup makes it answer that one for nothing
while the next one queues behind it. Lookups after the first go on beside the download,
one at a time, so waiting for them holds nothing up."""
MAX_IN_FLIGHT = 16
"""Piece requests a node keeps out at once, shared by the blobs it downloads (but at
least :data:`MIN_IN_FLIGHT` each): enough to fill a link, few enough that holders
(:data:`MAX_UPLOADS` slots and :data:`MAX_WAITING` waiting each) are not swamped with
requests they can only refuse."""
MIN_IN_FLIGHT = 4
MAX_UPLOADS = 8
"""Pieces a daemon sends to peers at the same time (``--max-uploads``)."""
BUSY_AFTER = 1.0
"""A piece request that waits this long for an upload slot is refused as busy."""
MAX_WAITING = 4
"""With every upload slot taken and this many requests waiting, a request is refused as
busy at once: the asker does better elsewhere than in a long queue here."""


def lookup_wait(rng: random.Random, jitter: float = LOOKUP_JITTER) -> float:
    """How long to wait for the next lookup (see :data:`LOOKUP_JITTER`)."""
    return LOOKUP_INTERVAL * (1.0 - jitter + 2.0 * jitter * rng.random())


def request_share(downloads: int, budget: int = MAX_IN_FLIGHT,
                  floor: int = MIN_IN_FLIGHT) -> int:
    """Each download's part of a node's request ``budget`` with ``downloads`` running."""
    return max(floor, budget // max(1, downloads))
