"""The swarm's timings and limits, in one place for the daemon and the simulation.

``p2pd/io/swarm.py`` and ``p2pd/io/peer.py`` run with them; ``simulations/node.py``
simulates the same daemon and must not import trio, so both read them from here.
Seconds and counts.
"""

from __future__ import annotations

import random
from typing import Final

# Final: the simulation's compiled build (mypyc) inlines these where they are used,
# instead of looking them up in this module's dict every time. (LOOKUP_BACKOFF stays
# plain: tests change it.)

LOOKUP_INTERVAL: Final = 0.25
"""How often a download asks its blob's coordinator who holds which pieces (on average:
see :data:`LOOKUP_JITTER`)."""
LOOKUP_JITTER: Final = 0.5
"""Each wait between lookups is drawn from ``LOOKUP_INTERVAL x (1 ± LOOKUP_JITTER)``.
Nodes that start a pull together would otherwise look up in step: all learn of a new
piece at the same instant and all ask its one holder for it, which serves
:data:`MAX_UPLOADS`, queues :data:`MAX_WAITING` and refuses the rest as busy. Simulated,
1,000 nodes pulling 1 GB at once on 10 Gbit/s links: busy refusals 1.21 M → 0.35 M and
p50 3.11 → 2.69 s with ±50 % (the same with ±100 %)."""
LEASE_RETRY: Final = 1.0
"""How often a download asks for the upstream lease while pieces nobody holds are wanted."""
ANNOUNCE_DELAY: Final = 0.1
"""Newly stored pieces are announced to the coordinator within this long (batched)."""
REANNOUNCE: Final = 20.0
"""Complete blobs are announced again this often (the coordinator's state is soft)."""
HOLDER_TTL: Final = 3 * REANNOUNCE
LEASE_DEFER: Final = LOOKUP_INTERVAL
"""A node asks for one upstream lease at a time, and while it fetches a blob from
upstream it waits this long before asking for another blob's (unless no other daemon is
alive). When nodes start a pull together the others take those leases meanwhile, so the
first copies come through several nodes' downlinks instead of all through the first
asker's (emulated, 4 nodes on 4 MiB/s links: the node that asked first took all four
layers' leases and the pull took 39 s; 21.7 s with them spread). A node pulling alone
in a cluster gets each further lease this much later."""
LEASE_TTL: Final = 5.0
STUCK_AFTER: Final = LEASE_TTL + 1.0
"""Pieces no usable peer has and nobody fetches for this long come from upstream anyway
(unless pieces are still on their way from peers: a slow peer is not a missing one; the
scheduler's request timeout takes care of peers that stop answering). "This long" is
since a piece last arrived here, or a lookup was first answered (or the first went
unanswered for :data:`LOOKUP_TIMEOUT`), showed a piece held that none had shown before,
or showed someone fetching upstream (a live lease): a swarm
that makes progress is not stuck, only slow to reach us (at thousands of nodes the
coordinator's first answers alone take seconds)."""
GONE_RETRY: Final = 5.0
"""A peer that could not be reached is not asked for pieces for this long, whatever
lookups say (its coordinator counts it as a holder until membership finds it down)."""
MISSING_RETRY: Final = 2.0
"""A peer that refused a piece it announced is asked for it again after this long (it
may have been about to publish it; or the coordinator's view of it is stale)."""
RPC_TIMEOUT: Final = 3.0
"""A coordinator that has not answered a lookup or lease request by then counts as
unreachable: the download goes on without it (solo: upstream for what no known peer has)."""
SAMPLE_ABOVE: Final = 64
"""A blob's coordinator with more askers than this answers lookups with holders drawn at
random instead of choosing for each asker (see ``p2pd.core.coordinator``)."""
LOOKUP_TIMEOUT: Final = 6.0
"""How long a lookup may wait for its answer (then the coordinator is taken as hung: the
download goes on with the peers it knows, and :data:`STUCK_AFTER` later upstream). Longer
than :data:`RPC_TIMEOUT`: a coordinator that thousands of nodes look up at once takes
seconds to answer each, and giving up on a lookup makes it answer that one for nothing
while the next one queues behind it. Lookups after the first go on beside the download,
one at a time, so waiting for them holds nothing up."""
MAX_IN_FLIGHT: Final = 16
"""Piece requests a node keeps out at once, shared by the blobs it downloads (but at
least :data:`MIN_IN_FLIGHT` each): enough to fill a link, few enough that holders
(:data:`MAX_UPLOADS` slots and :data:`MAX_WAITING` waiting each) are not swamped with
requests they can only refuse."""
MIN_IN_FLIGHT: Final = 4
MAX_UPLOADS: Final = 8
"""Pieces a daemon sends to peers at the same time (``--max-uploads``)."""
BUSY_AFTER: Final = 1.0
"""A piece request that waits this long for an upload slot is refused as busy."""
MAX_WAITING: Final = 4
"""With every upload slot taken and this many requests waiting, a request is refused as
busy at once: the asker does better elsewhere than in a long queue here."""


LOOKUP_BACKOFF = 6.0
"""A download waits at least this many times its last lookup's answer time before the
next lookup, up to :data:`LOOKUP_BACKOFF_MAX`. A coordinator answers its askers' lookups
one after another, so a slow answer means a queue at the coordinator: askers that back
off in proportion shorten it (no message needed: the delay is the signal). A
coordinator that keeps up answers in a millisecond or two, which changes nothing.
Simulated, 1 GB in 4 MiB pieces on 10 Gbit/s links, the coordinators' CPU charged:
10,000 nodes p50 8.96 → 6.87 s, all done 9.42 → 7.97 s, 28.8 M → 19.8 M events;
1,000 nodes p50 2.79 → 2.70 s. Without :data:`LOOKUP_BACKOFF_MAX`, three times the
delay gave 7.64 s at 10,000 nodes and six times 6.21 s; but with three times, 40 nodes
whose coordinator costs 300 times as much waited 7.8 s after their first answer, and
two went upstream for pieces (the registry sent the image 1.44 times)."""
LOOKUP_BACKOFF_MAX: Final = 8 * LOOKUP_INTERVAL
"""The longest wait between lookups that backing off makes: the first answers come late
to everyone who started at once (the queue is every asker's first lookup), and a
download that knows no holder yet must not sit out the swarm's start."""


def lookup_wait(rng: random.Random, jitter: float = LOOKUP_JITTER,
                answered_in: float = 0.0) -> float:
    """How long to wait for the next lookup (see :data:`LOOKUP_JITTER`), at least
    :data:`LOOKUP_BACKOFF` times ``answered_in``, the last answer's delay (but not over
    :data:`LOOKUP_BACKOFF_MAX` for that)."""
    wait = LOOKUP_INTERVAL * (1.0 - jitter + 2.0 * jitter * rng.random())
    return max(wait, min(LOOKUP_BACKOFF * answered_in, LOOKUP_BACKOFF_MAX))


def request_share(downloads: int, budget: int = MAX_IN_FLIGHT,
                  floor: int = MIN_IN_FLIGHT) -> int:
    """Each download's part of a node's request ``budget`` with ``downloads`` running."""
    return max(floor, budget // max(1, downloads))
