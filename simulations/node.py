"""A simulated p2pd node: the real ``p2pd.core`` classes, driven as ``p2pd.io.swarm`` does.

How it works. Each :class:`SimNode` is one host of the :mod:`simulations.network`, with
its own :class:`~p2pd.core.coordinator.Coordinator` (it coordinates the blobs whose
rendezvous order it heads, found with :func:`~p2pd.core.membership.coordinator_for`
over all node names), a :class:`~p2pd.core.peerscore.PeerScores` and, per blob, a
:class:`BlobDownload` holding a :class:`~p2pd.core.scheduler.Scheduler`. A download
loops like ``_Fetch.run`` in ``p2pd/io/swarm.py``: look the swarm up at the coordinator
every :data:`LOOKUP_INTERVAL` ± :data:`LOOKUP_JITTER` (``lookup_wait``) and feed the
holders to the scheduler (``peer_update``);
ask for the upstream lease when pieces nobody holds are wanted (every
:data:`LEASE_RETRY`), set the lease as the scheduler's upstream range; go solo when no
piece arrived for :data:`STUCK_AFTER`; ``tick``; then carry out ``next_actions``:
``RequestPiece`` is a request to the holder and a flow of the piece's bytes back,
``FetchUpstream`` a ``Range`` request to the registry per contiguous run, streamed as
one flow per piece. Arrivals feed ``piece_received`` / ``upstream_received`` /
``refused``; held pieces are announced (full snapshot) within :data:`ANNOUNCE_DELAY`.
A piece arriving from a peer brings the pieces that peer held when it began to send it
(its ``HAVE``), of which the asker takes those whose hash it knows: the pieces its
last lookup showed announced (``PeerList.announced``).
Holders serve at most :data:`MAX_UPLOADS` requests at once; up to :data:`MAX_WAITING`
more wait for a slot and are refused as busy after :data:`BUSY_AFTER`, any beyond are
refused at once, like ``p2pd/io/peer.py``; the asker's scheduler rests that peer.
A holder's pieces for one asker go one after another on their connection, each holding
its slot until its last byte has left (the daemon sends whole frames onto a connection
one at a time): one flow per connection, which goes on with the next piece at its rate.
The requests one turn of the loop sends to one holder travel as one event, and so do
the refusals a holder answers them with at once: the same calls as one event per
message, which would all fall due at the same instant (the cost of a large run is
mostly these refusals). Only in the endgame, where a turn may ask a holder, then
another, then the first again, do the first holder's requests arrive together before
the second's. Waiting requests are refused by one timer per holder, armed for the
front of its queue.

Simplifications (each a deliberate difference from the daemon):

- RPCs to the coordinator (lookup, lease, announce) cost one-way link latency each way,
  no bandwidth, and the coordinator's CPU (:data:`COORDINATOR_CPU`, unless the scenario
  sets ``coordinator_cpu=False``): each coordinator works through the messages sent to
  it one at a time, in the order they were sent, on one core (its node's own downloads
  and uploads take none of that core). As in the daemon, the first lookup and every
  lease request are awaited by the loop; later lookups go on beside it, one at a time,
  each ``lookup_wait`` after the last answer (longer after a slow one, as the daemon's:
  ``LOOKUP_BACKOFF``); announcements go out no more often than
  the last lookup took to answer; an answer later than ``LOOKUP_TIMEOUT`` (leases:
  ``RPC_TIMEOUT``) is given up on (the coordinator is asked again later), and a dead
  coordinator sends the download solo. Messages are never lost; a node fails only by
  crashing (``--failures``).
- No integrity: every piece verifies, and announcements carry no hashes; a piece's hash
  counts as known to a node once a lookup answer showed the piece announced (the
  daemon's answers carry the table of the hashes announced).
- A holder known to be complete is fed with ``complete=True`` (the same mask as listing
  every piece, without building it).
- ``CancelRequest`` is ignored, as ``_Fetch.run`` ignores it: endgame duplicates run on.
- The pieces of an upstream run follow each other with one latency between them. (An
  upload slot is freed when the piece's last byte has left, as the daemon releases it
  when its send returns; the receiver has the piece one latency later.)
- Lookup answers are fed incrementally: a holder whose bits only grew since it was last
  fed gets ``peer_has`` of the new pieces instead of ``peer_update`` of all of them (the
  scheduler ends in the same state; ``_fed`` tracks what the scheduler believes).
  Busy requests are queued FIFO at the holder as the daemon's semaphore does.
- The last piece of a blob is announced and served only when the download is complete
  (the daemon publishes it after the whole blob matched its digest); a piece a holder
  refused as missing is asked of it again after :data:`MISSING_RETRY`.
- The timings and limits are the daemon's own, from :mod:`p2pd.core.tuning`.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final, cast

from p2pd.core.coordinator import Coordinator, Lease, PeerList
from p2pd.core.peerscore import PeerScores
from p2pd.core.pieces import PieceLayout
from p2pd.core.scheduler import CancelRequest, FetchUpstream, RequestPiece, Scheduler
from p2pd.core.tuning import (
    ANNOUNCE_DELAY,
    BUSY_AFTER,
    HOLDER_TTL,
    LEASE_DEFER,
    LEASE_RETRY,
    LEASE_TTL,
    LOOKUP_INTERVAL,
    LOOKUP_JITTER,
    LOOKUP_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_UPLOADS,
    MAX_WAITING,
    MIN_IN_FLIGHT,
    MISSING_RETRY,
    REANNOUNCE,
    RPC_TIMEOUT,
    STUCK_AFTER,
    lookup_wait,
    request_share,
)
from simulations.engine import Engine, Timer
from simulations.network import Flow, Host, Network

if TYPE_CHECKING:
    from simulations.cluster import Cluster

__all__ = ["BlobDownload", "BlobSpec", "Coordinator", "PieceLayout", "Scheduler", "SimNode"]

CONNECT_REFUSED: Final = 0.0  # extra time for a request to a dead daemon to fail (beyond the RTT)
MIN_WAIT: Final = 0.01  # the daemon's loop never sleeps less than this
_LOOKUP: Final = "lookup"
_LEASE: Final = "lease"
_ANNOUNCE: Final = "announce"

COORDINATOR_CPU = {"lookup": (215e-6, 0.28e-6), "sampled lookup": (49e-6, 0.012e-6),
                   "announce": (32e-6, 0.11e-6), "lease": (32e-6, 0.11e-6)}
"""Seconds of one core a coordinator spends on a message: ``fixed + per_piece x pieces``
of the blob. Fitted to ``python -m benchmarks.bench_coordinator --holders 4096`` (the
daemon's own path from frame to answer frame, socket I/O left out, so a lower bound):
lookups answered with the rarest holders for the asker 236 / 288 / 322 µs, with holders
drawn at random (a swarm of more than ``SAMPLE_ABOVE`` askers) 51 / 50 / 54 µs,
announcements of one new piece 40 / 58 / 72 µs at 64 / 256 / 384 pieces. A lookup is
charged as drawn at random when more than ``SAMPLE_ABOVE`` nodes have asked the
coordinator about the blob by the time it gets to it. A lease request is taken to cost
what an announcement does (it was not measured). The benchmark's holders do not change
between its lookups, so each holder's message is built once; in a busy swarm a holder
announces a few times a second and is drawn into dozens of answers in between."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The daemon's own limits, as simulated (defaults: the daemon's).

    ``piece_size`` overrides the daemon's piece size rule (``None``: the rule).
    """

    max_uploads: int = MAX_UPLOADS
    max_waiting: int = MAX_WAITING
    max_in_flight: int = MAX_IN_FLIGHT
    min_in_flight: int = MIN_IN_FLIGHT
    max_in_flight_per_peer: int = 4
    piece_size: int | None = None
    layer_concurrency: int = 3  # containerd's max_concurrent_downloads
    upload_limit: float | None = None  # the daemon's --upload-limit, bytes/s
    download_limit: float | None = None  # its --download-limit
    lookup_jitter: float = LOOKUP_JITTER  # 0: every node looks up in step

    def layout(self, size: int) -> PieceLayout:
        """The piece layout of a blob of ``size`` bytes."""
        if self.piece_size is None:
            return PieceLayout.for_size(size)
        return PieceLayout(size, self.piece_size)


@dataclass(frozen=True, slots=True)
class BlobSpec:
    """A blob of the image: its digest and size in bytes."""

    digest: str
    size: int


def _arrival_order(arrival: tuple[float, int, str, str, str, int, tuple[object, ...],
                                   float]) -> tuple[float, int]:
    return arrival[0], arrival[1]


def encode_answer(answer: object) -> tuple[object, ...]:
    """A coordinator's answer (a :class:`PeerList`, a :class:`Lease` or none) as plain
    values, to cross between partitions (``marshal``: fast, and a name repeated in a
    window's messages is sent once)."""
    if isinstance(answer, PeerList):  # what a download reads of it (BlobDownload._peers)
        holders = answer.holders
        return ("peers", tuple(h.node_id for h in holders), tuple(h.bits for h in holders),
                tuple(h.complete for h in holders),
                tuple(lease.node_id for lease in answer.fetchers), answer.announced)
    if isinstance(answer, Lease):
        return ("lease", *_lease_values(answer))
    if answer is None:
        return ("none",)
    raise TypeError(f"cannot encode {answer!r}")


def _lease_values(lease: Lease) -> tuple[str, int, int, float]:
    return lease.node_id, lease.first_piece, lease.last_piece, lease.expires


def decode_answer(values: tuple[object, ...]) -> object:
    """The lease or none that :func:`encode_answer` made these values of (a lookup's
    answer is read as it comes: :meth:`BlobDownload._peers_sent`)."""
    kind = values[0]
    if kind == "lease":
        node_id, first, last, expires = values[1:]
        assert isinstance(node_id, str) and isinstance(first, int) and isinstance(last, int)
        assert isinstance(expires, float)
        return Lease(node_id, first, last, expires)
    if kind == "none":
        return None
    raise ValueError(f"not a lease or none: {kind!r}")


class _Connection:
    """A holder's connection to one asker: the piece on the wire (``sending``: digest,
    index and the holder's ``HAVE`` bits) and those queued behind it, each holding an
    upload slot. The daemon sends whole frames onto a connection one at a time
    (``p2pd.io.peer._Sender``), so one flow carries them in turn."""

    __slots__ = ("asker", "flow", "queue", "sending")

    def __init__(self, asker: SimNode, piece: tuple[str, int, int]) -> None:
        self.asker = asker
        self.sending = piece
        self.flow: Flow | None = None
        # (a list: a few pieces at most, and compiled, a deque's methods are generic calls)
        self.queue: list[tuple[str, int, int]] = []


class _Requests(Timer):
    """``asker``'s requests for pieces of ``digest`` reaching ``holder`` (of the same
    partition) at ``time``: its own event (not a timer and a partial)."""

    __slots__ = ("asker", "digest", "holder", "indices")

    def __init__(self, time: float, holder: SimNode, asker: SimNode, digest: str,
                 indices: list[int]) -> None:
        super().__init__(time)
        self.holder, self.asker, self.digest, self.indices = holder, asker, digest, indices

    def run(self) -> None:
        self.holder.on_requests(self.asker, self.digest, self.indices)


class _Refusals(Timer):
    """``holder``'s refusals reaching ``asker`` (of the same partition) at ``time``: its
    own event."""

    __slots__ = ("asker", "digest", "holder", "refusals")

    def __init__(self, time: float, asker: SimNode, holder: str, digest: str,
                 refusals: Sequence[tuple[int, bool]]) -> None:
        super().__init__(time)
        self.asker, self.holder, self.digest, self.refusals = asker, holder, digest, refusals

    def run(self) -> None:
        self.asker.refusals(self.holder, self.digest, self.refusals)


class _Turn(Timer):
    """A turn of ``download``'s loop, at ``time``: poked (:meth:`BlobDownload.poke`, its
    ``_soon``) or timed (its ``_wake``); its own event, a direct call."""

    __slots__ = ("download",)

    def __init__(self, time: float, download: BlobDownload) -> None:
        super().__init__(time)
        self.download = download

    def run(self) -> None:
        download = self.download
        if download._soon is self:
            download._soon = None
        else:  # (a replaced wake-up is cancelled: a timed turn that runs is ``_wake``)
            download._wake = None
        download.step()


class _Delivered:
    """What a piece's arrival at ``download``'s node (of the same partition) does: the
    flow's ``on_done`` (one object, not a closure and its environment)."""

    __slots__ = ("bits", "download", "holder", "index")

    def __init__(self, download: BlobDownload, holder: str, index: int, bits: int) -> None:
        self.download, self.holder, self.index, self.bits = download, holder, index, bits

    def __call__(self) -> None:
        download = self.download
        if not download.node.crashed:
            download.from_peer(self.holder, self.index, self.bits)


class _Posted:
    """What a piece's arrival at another partition's ``asker`` does when its last byte is
    sent (the flow's ``on_done``): the message, ``delay`` later."""

    __slots__ = ("asker", "bits", "delay", "digest", "holder", "index")

    def __init__(self, holder: SimNode, asker: SimNode, delay: float, digest: str,
                 index: int, bits: int) -> None:
        self.holder, self.asker, self.delay, self.digest = holder, asker, delay, digest
        self.index, self.bits = index, bits

    def __call__(self) -> None:
        holder = self.holder
        holder.cluster.post_piece(holder.engine.now + self.delay, self.asker, holder,
                                  self.digest, self.index, self.bits)


class SimNode:
    """One simulated host running p2pd (see the module docstring)."""

    def __init__(self, cluster: Cluster, name: str, host: Host, rng: random.Random) -> None:
        self.cluster, self.name, self.host, self.rng = cluster, name, host, rng
        self.index = len(cluster.nodes)  # its place in the cluster's order
        self.engine: Engine = cluster.engine
        self.network: Network = cluster.network
        self.limits: Limits = cluster.scenario.limits
        self.coordinator = Coordinator(rng=cluster.engine.child_rng(), holder_ttl=HOLDER_TTL,
                                       layout=self.limits.layout,
                                       lease_ttl=LEASE_TTL)
        self.scores = PeerScores()
        self.downloads: dict[str, BlobDownload] = {}
        self.held: dict[str, int] = {}  # digest -> bitfield of held pieces
        self.uploading = 0
        # requests waiting for an upload slot: (asker, digest, index, refused at); at most
        # ``max_waiting``, so a list (compiled, a deque's methods are generic calls)
        self._queue: list[tuple[SimNode, str, int, float]] = []
        self._expiry: Timer | None = None  # refuses the queue's front when it is due
        self._conns: dict[SimNode, _Connection] = {}  # to each asker we send pieces
        self._waiting: deque[BlobSpec] = deque()  # layers containerd has not asked for yet
        self._active: list[BlobDownload] = []
        self.dead: set[str] = set()  # peers found dead (membership)
        self.crashed = False
        self.cpu_free = 0.0  # when this node's coordinator is through its queued work
        # who sent this node's coordinator lookups or lease requests, per blob: as many as
        # it will have seen when it works through the next one (its queue is FIFO)
        self.askers: dict[str, set[str]] = {}
        # calls on their way (partitioned runs), by when they arrive: each instant's
        # take their places in the queue together, in a fixed order
        self._arrivals: dict[float, list[tuple[float, int, str, str, str, int,
                                               tuple[object, ...], float]]] = {}
        self.done_at: float | None = None
        self.started_at: float | None = None

    def here(self, other: SimNode) -> bool:
        """Whether ``other`` runs in this node's partition (always, unpartitioned)."""
        return other.host.part == self.host.part

    def post(self, at: float, to: SimNode, method: str, *args: object) -> None:
        """Have ``to`` (another partition's node) run ``method(*args)`` at ``at``."""
        self.cluster.post(at, to.host.part, to.name, method, args)

    def send(self, at: float, to: SimNode, method: str, *args: object) -> None:
        """Have ``to`` run ``method(*args)`` at ``at``: a message if it is another
        partition's, else an event."""
        if self.here(to):
            self.engine.schedule_at(at, partial(getattr(to, method), *args))
        else:
            self.post(at, to, method, *args)

    def start(self, blobs: list[BlobSpec]) -> None:
        """Begin pulling ``blobs`` now, ``layer_concurrency`` at a time (as containerd)."""
        self.started_at = self.engine.now
        self._waiting.extend(blobs)
        for _ in range(self.limits.layer_concurrency):
            self._next_blob()

    def _next_blob(self) -> None:
        if not self._waiting or self.crashed:
            return
        blob = self._waiting.popleft()
        download = self.downloads[blob.digest] = BlobDownload(self, blob)
        self.held[blob.digest] = 0
        self._active.append(download)
        self._share_requests()
        download.step()

    def _share_requests(self) -> None:
        """Split ``max_in_flight`` among the downloads in progress, as the daemon does."""
        limits, active = self.limits, self._active
        share = request_share(len(active), limits.max_in_flight, limits.min_in_flight)
        for download in active:
            download.sched.set_max_in_flight(share)
            download.poke()

    def blob_done(self, download: BlobDownload) -> None:
        """``download`` completed; the next layer starts; done when all are."""
        self._active.remove(download)
        self._share_requests()
        self._next_blob()
        if self.done_at is None and not self._active and not self._waiting:
            self.cluster.unpacking.start(self.name, self._finished)

    def _finished(self) -> None:
        if self.crashed:
            return
        self.done_at = self.engine.now
        self.cluster.node_done(self)
        self.engine.schedule(REANNOUNCE, self._reannounce)

    def _reannounce(self) -> None:
        if self.cluster.finished or self.crashed:
            return
        for download in self.downloads.values():
            download.announce()
        self.engine.schedule(REANNOUNCE, self._reannounce)

    def leasing(self, besides: BlobDownload) -> bool:
        """Whether a download other than ``besides`` is asking for its upstream lease."""
        return any(d.leasing for d in self._active if d is not besides)

    def fetching_upstream(self, besides: BlobDownload) -> bool:
        """Whether a download other than ``besides`` holds an upstream lease with pieces
        still to fetch, and other nodes could take further leases (``Swarm.fetching_upstream``)."""
        return any(d.sched.fetching_upstream for d in self._active if d is not besides) and \
            len(self.cluster.nodes) > 1

    # -- RPCs ---------------------------------------------------------------------------

    def call(self, target: SimNode, query: Callable[[], object],
             answer: Callable[[object], None] | None, *, cost: float = 0.0,
             timeout: Callable[[bool], None] | None = None,
             patience: float = RPC_TIMEOUT) -> None:
        """Run ``query`` at ``target`` one latency from now and, if ``answer`` is given,
        hand it the result one more latency later (at once if ``target`` is us).

        ``cost``: the seconds of the target's core the query takes. The target works
        through such queries one at a time, in the order they were sent, so the query
        runs when the target's core is free and ``cost`` has passed. ``timeout`` runs
        instead of ``answer`` ``patience`` seconds after the call if the answer would
        come later (``timeout(False)``: the query still costs the target) or never
        (``timeout(True)``: a dead target)."""
        engine = self.engine
        if target is self and not cost:
            result = query()
            if answer is not None:
                answer(result)
            return
        delay = 0.0 if target is self else self.network.latency(self.host, target.host)
        sent = engine.now
        at = sent + delay
        if cost:
            at = target.cpu_free = max(at, target.cpu_free) + cost
        late = timeout is not None and at + delay - sent > patience
        if late:
            assert timeout is not None
            engine.schedule_at(sent + patience, partial(timeout, False))

        def arrive() -> None:
            if target.crashed:
                if timeout is not None and not late:
                    engine.schedule_at(sent + patience, partial(timeout, True))
                return
            result = query()
            if answer is None or late:
                return
            if delay:
                engine.schedule(delay, lambda: answer(result) if not self.crashed else None)
            else:
                answer(result)

        engine.schedule_at(at, arrive)

    def remote_call(self, target: SimNode, kind: str, blob: BlobSpec,
                    payload: tuple[object, ...] = (), patience: float = RPC_TIMEOUT) -> None:
        """:meth:`call` in a partitioned run: a lookup, lease request or announcement
        (``payload``: its bits and whether complete) told to the coordinator's node now
        (:meth:`rpc`; another partition's when the window's messages are delivered),
        queued there when it arrives."""
        now = self.engine.now
        at = now + self.network.latency(self.host, target.host)
        if self.here(target):
            target.rpc(at, self.name, kind, blob.digest, blob.size, payload, now, patience)
        else:  # delivered as a call of rpc at the window's end (Cluster.deliver)
            self.post(at, target, "rpc", self.name, kind, blob.digest, blob.size, payload,
                      now, patience)

    def rpc(self, at: float, caller: str, kind: str, digest: str, size: int,
            payload: tuple[object, ...], sent: float, patience: float) -> None:
        """A :meth:`remote_call` arrives at ``at`` (told when sent, or when delivered
        from another partition: before ``at`` either way, so one event takes an
        instant's calls in). The calls arriving at the same instant take their places
        in the coordinator's queue together, ordered by when they were sent and then by
        the callers' places in the cluster: the order an unpartitioned run sends them
        in when all nodes start at once. (In the order the events came up, calls from
        the coordinator's own partition, scheduled when sent, would come before the
        other's, delivered at the end of a window: at the start, with every node asking
        at the same instant, that half would be answered first and hold the pieces
        first.)"""
        arrivals = self._arrivals.get(at)
        if arrivals is None:
            arrivals = self._arrivals[at] = []
            self.engine.schedule_at(at, partial(self._queue_arrivals, at))
        arrivals.append((sent, self.cluster.nodes[caller].index, caller, kind, digest, size,
                         payload, patience))

    def _queue_arrivals(self, at: float) -> None:
        arrivals = self._arrivals.pop(at)
        if len(arrivals) > 1:
            arrivals.sort(key=_arrival_order)
        for sent, _, caller, kind, digest, size, payload, patience in arrivals:
            self._arrived(caller, kind, digest, size, payload, sent, patience)

    def _arrived(self, caller: str, kind: str, digest: str, size: int,
                 payload: tuple[object, ...], sent: float, patience: float) -> None:
        """A call takes its place in the coordinator's queue: as :meth:`call` does, seen
        from the target (``call``, in an unpartitioned run, takes it when sent: the same
        order, but for the coordinator's node's own calls, which arrive at once)."""
        now = self.engine.now
        cost = self.call_cost(caller, kind, digest, self.cluster.layout(size).count)
        at = now
        if cost:
            at = self.cpu_free = max(now, self.cpu_free) + cost
        delay = now - sent
        late = kind != _ANNOUNCE and at + delay - sent > patience
        asker = self.cluster.nodes[caller]
        if late:
            self.send(sent + patience, asker, "rpc_timeout", kind, digest, False)
        work = partial(self._serve, asker, kind, digest, size, payload, sent, patience, late)
        if at > now:
            self.engine.schedule_at(at, work)
        else:
            work()

    def _serve(self, asker: SimNode, kind: str, digest: str, size: int,
               payload: tuple[object, ...], sent: float, patience: float, late: bool) -> None:
        now, coordinator = self.engine.now, self.coordinator
        if self.crashed:
            if kind != _ANNOUNCE and not late:
                self.send(sent + patience, asker, "rpc_timeout", kind, digest, True)
            return
        if kind == _ANNOUNCE:
            bits, complete = payload
            assert isinstance(bits, int) and isinstance(complete, bool)
            coordinator.announce(digest, size, asker.name, asker.name, bits, complete, {}, now)
            return
        result: object
        if kind == _LEASE:
            result = coordinator.request_lease(digest, size, asker.name, now)
        else:
            result = coordinator.lookup(digest, size, asker.name, now)
        if not late:
            delay = self.network.latency(self.host, asker.host)
            self.send(now + delay, asker, "rpc_answer", kind, digest, encode_answer(result))

    def rpc_answer(self, kind: str, digest: str, answer: tuple[object, ...]) -> None:
        """The answer to our :meth:`remote_call` has come."""
        if not self.crashed:
            download = self.downloads[digest]
            if kind == _LOOKUP:
                _, ids, bits, complete, fetchers, announced = answer
                download._peers_sent(
                    cast("tuple[str, ...]", ids), cast("tuple[int, ...]", bits),
                    cast("tuple[bool, ...]", complete), cast("tuple[str, ...]", fetchers),
                    cast(int, announced))
            else:
                download._granted(decode_answer(answer))

    def rpc_timeout(self, kind: str, digest: str, gone: bool) -> None:
        """Our :meth:`remote_call` went unanswered (``gone``: its target is dead)."""
        self.downloads[digest]._unreachable(kind, gone)

    def call_cost(self, caller: str, kind: str, digest: str, pieces: int) -> float:
        """The CPU this node's coordinator spends on a ``kind`` of call (lookup, lease or
        announce) from ``caller`` about a blob of ``pieces``. Lookups and leases count
        the caller among the blob's askers: a lookup is charged as sampled once more
        than ``sample_above`` of them have asked."""
        if kind == _ANNOUNCE:
            return self.cpu_cost("announce", pieces)
        askers = self.askers.get(digest)
        if askers is None:
            askers = self.askers[digest] = set()
        askers.add(caller)
        if kind == _LEASE:
            return self.cpu_cost("lease", pieces)
        sampled = len(askers) > self.coordinator.sample_above
        return self.cpu_cost("sampled lookup" if sampled else "lookup", pieces)

    def cpu_cost(self, kind: str, pieces: int) -> float:
        """The coordinator's CPU for one ``kind`` of message about a blob of ``pieces``
        (0 when the scenario leaves coordinators free)."""
        if not self.cluster.scenario.coordinator_cpu:
            return 0.0
        fixed, per_piece = COORDINATOR_CPU[kind]
        return fixed + per_piece * pieces

    # -- the upload side ----------------------------------------------------------------

    def on_request(self, asker: SimNode, digest: str, index: int) -> None:
        """A piece request has arrived from ``asker``."""
        self.on_requests(asker, digest, (index,))

    def on_requests(self, asker: SimNode, digest: str, indices: Sequence[int]) -> None:
        """Piece requests sent together by ``asker`` have arrived, in this order.

        One event for the requests a turn of the asker's loop sent this holder, and one
        for the refusals answered at once: the same calls as one event per message
        (they would all be due at the same instant, one after the other)."""
        if self.crashed:  # connection refused: the asker finds this daemon gone
            self._reply(asker, "gone_peer", (digest, self.name), CONNECT_REFUSED)
            return
        refusals: list[tuple[int, bool]] = []
        held, queue, now = self.held.get(digest, 0), self._queue, self.engine.now
        for index in indices:
            if not held >> index & 1:
                refusals.append((index, False))
            elif self.uploading < self.limits.max_uploads:
                self._upload(asker, digest, index)
            else:
                # Wait FIFO for a slot, for up to BUSY_AFTER, if fewer than MAX_WAITING
                # wait already (else refused at once). Waits are equally long, so the
                # front of the queue is due first: one timer per holder refuses it when
                # it is due (and re-arms for the next), not one per waiting request.
                self._refuse_due(now)
                if len(queue) >= self.limits.max_waiting:
                    refusals.append((index, True))
                    continue
                queue.append((asker, digest, index, now + BUSY_AFTER))
                if self._expiry is None:
                    self._expiry = self.engine.schedule(BUSY_AFTER, self._expire)
        if refusals:
            self._refuse(asker, digest, refusals)

    def _refuse_due(self, now: float) -> None:
        """Refuse as busy the waiting requests that have waited ``BUSY_AFTER``."""
        queue = self._queue
        while queue and queue[0][3] <= now:
            asker, digest, index, _ = queue.pop(0)
            self._refuse(asker, digest, ((index, True),))

    def _expire(self) -> None:
        self._expiry = None
        self._refuse_due(self.engine.now)
        if self._queue:
            self._expiry = self.engine.schedule_at(self._queue[0][3], self._expire)

    def receive(self, method: str, args: list[object], at: int, count: int) -> None:
        """Run ``method`` with ``count`` arguments from ``args[at]`` on: an uncommon
        message from another partition's node (the common ones come as
        :class:`~simulations.cluster.Arrival`)."""
        getattr(self, method)(*args[at:at + count])

    def refusals(self, holder: str, digest: str,
                 refusals: Sequence[tuple[int, bool]]) -> None:
        """``holder`` refused these pieces (busy or not held)."""
        if self.crashed:
            return
        download = self.downloads[digest]
        for index, busy in refusals:
            download.refused(holder, index, busy)

    def gone_peer(self, digest: str, holder: str) -> None:
        """The connection to ``holder`` for ``digest`` failed."""
        if not self.crashed:
            self.downloads[digest].gone(holder)

    def piece(self, holder: str, digest: str, index: int, bits: int) -> None:
        """Piece ``index`` from another partition's ``holder`` has arrived."""
        if not self.crashed:
            self.downloads[digest].from_peer(holder, index, bits)

    def upstream_got(self, digest: str, index: int) -> None:
        """Piece ``index`` from another partition's registry has arrived."""
        if not self.crashed:
            self.downloads[digest].upstream_got(index)

    def _reply(self, asker: SimNode, method: str, args: tuple[object, ...],
               extra: float = 0.0) -> None:
        """Have ``asker`` run ``method(*args)`` one latency (and ``extra``) from now."""
        delay = self.network.latency(self.host, asker.host) + extra
        if self.here(asker):
            self.engine.schedule(delay, partial(getattr(asker, method), *args))
        else:
            self.post(self.engine.now + delay, asker, method, *args)

    def _refuse(self, asker: SimNode, digest: str,
                refusals: Sequence[tuple[int, bool]]) -> None:
        """``asker`` hears one latency from now that we refused these pieces."""
        at = self.engine.now + self.network.latency(self.host, asker.host)
        if self.here(asker):
            self.engine.add(_Refusals(at, asker, self.name, digest, refusals))
        else:
            self.cluster.post_refusals(at, asker, self, digest, refusals)

    def _upload(self, asker: SimNode, digest: str, index: int) -> None:
        """Send ``asker`` piece ``index`` (an upload slot is ours): at once if our
        connection to it is idle, else after the pieces queued on it."""
        self.uploading += 1
        piece = (digest, index, self.held.get(digest, 0))  # with our HAVE as of now
        conn = self._conns.get(asker)
        if conn is not None:
            conn.queue.append(piece)
            return
        conn = self._conns[asker] = _Connection(asker, piece)
        length, done = self._piece(asker, piece)
        conn.flow = self.network.transfer(self.host, asker.host, length, done, tag="peer",
                                          on_sent=self._slot_freed,
                                          more=partial(self._next_piece, conn),
                                          delay=None if self.here(asker) else 0.0)

    def _piece(self, asker: SimNode, piece: tuple[str, int, int]
               ) -> tuple[int, Callable[[], None]]:
        """The length of ``piece`` and what its arrival at ``asker`` does."""
        digest, index, bits = piece
        if not self.here(asker):  # the flow calls it when sent: the arrival is posted
            delay = self.network.latency(self.host, asker.host)
            return self.downloads[digest].layout.length(index), _Posted(
                self, asker, delay, digest, index, bits)
        download = asker.downloads[digest]
        return download.layout.length(index), _Delivered(download, self.name, index, bits)

    def _next_piece(self, conn: _Connection) -> tuple[int, Callable[[], None]] | None:
        """The piece ``conn`` sends next, now that the last one is sent (``None``: the
        connection is idle, and closed here)."""
        if not conn.queue:
            del self._conns[conn.asker]
            return None
        conn.sending = conn.queue.pop(0)
        return self._piece(conn.asker, conn.sending)

    def lost_flows(self) -> None:
        """This node crashed: this partition's flows to it stop, and their senders'
        connections break."""
        network, nodes = self.network, self.cluster.nodes
        for flow in list(self.host.downs[network.part].flows):
            uploader = nodes.get(flow.src.name)
            network.cancel(flow)
            if uploader is not None:
                uploader._broken(self)

    def _broken(self, asker: SimNode) -> None:
        """``asker`` died: the pieces on our connection to it give their slots back."""
        conn = self._conns.pop(asker, None)
        if conn is not None:
            for _ in range(1 + len(conn.queue)):
                self._slot_freed()

    def _slot_freed(self) -> None:
        self.uploading -= 1
        queue = self._queue
        self._refuse_due(self.engine.now)
        while queue:
            asker, digest, index, _ = queue.pop(0)
            if not asker.crashed:
                self._upload(asker, digest, index)
                break

    # -- failures -----------------------------------------------------------------------

    def crash(self) -> None:
        """The node dies now: its transfers stop, its requests and calls go unanswered,
        and peers downloading from it see their connections reset (one latency later)."""
        self.crashed = True
        network, cluster = self.network, self.cluster
        for conn in list(self._conns.values()):
            if conn.flow is not None:
                network.cancel(conn.flow)
            asker = conn.asker
            for digest in dict.fromkeys([conn.sending[0], *(p[0] for p in conn.queue)]):
                self._reply(asker, "gone_peer", (digest, self.name))
        self._conns.clear()
        self.lost_flows()
        cluster.crashed(self)
        if self._expiry is not None:
            self._expiry.cancel()
        self._queue.clear()
        for download in self._active:
            download.stop()


class BlobDownload:
    """One blob's download on one node: ``_Fetch`` of ``p2pd/io/swarm.py``, simulated."""

    def __init__(self, node: SimNode, blob: BlobSpec) -> None:
        self.node, self.blob, self.engine = node, blob, node.engine
        limits = node.limits
        self.layout = node.cluster.layout(blob.size)
        self.sched = Scheduler(self.layout, rng=node.rng, scores=node.scores,
                               max_in_flight=limits.max_in_flight,
                               max_in_flight_per_peer=limits.max_in_flight_per_peer)
        self._upstream_flows: dict[Flow, None] = {}
        self.upstream = range(0)
        self.solo = False
        self.refused_by: dict[str, dict[int, float]] = {}  # peer -> piece -> until
        self.last_progress = self.engine.now
        self.next_lookup = self.next_lease = 0.0
        self.deferred = False  # the first lease request, while the node fetches another blob
        self.lease_asked: float | None = None  # when a lease request went out, unanswered
        self.awaiting: str | None = None  # _LOOKUP or _LEASE: the loop awaits its answer
        self.resumed = False  # the lease answer came: the turn goes on past the lease
        self.announce_due = False
        self._announcer: Timer | None = None
        self._wake: Timer | None = None  # the next timed turn of the loop
        self._soon: Timer | None = None  # a turn at this instant (poked)
        self.cancels_ignored = 0
        self.lost = 0  # lookups and lease requests a dead coordinator did not answer
        self.slow = 0  # ... that a live one did not answer in time
        self.lookup_time = 0.0  # how long the last lookup took to answer (or to give up on)
        self.answer_time = 0.0  # how long the last answered lookup took
        self.lookup_sent = 0.0
        self.seen = 0  # pieces lookups showed held by someone (a mask)
        self.hashed = 0  # pieces whose hash we know (announced by our last lookup's time)
        self.answered = False  # a lookup was answered (or the first one given up on)
        self.completed = False
        # What each peer was last fed with: feeding the same bits again is a no-op unless
        # a refusal or a timeout has made the scheduler forget pieces since (refusals
        # edit this, timeouts clear it), so it is skipped (lookups are the hot path).
        self._fed: dict[str, int] = {}

    @property
    def coordinator(self) -> SimNode:
        """The blob's coordinator among the members alive as far as the cluster knows."""
        return self.node.cluster.coordinator_of(self.blob.digest)

    def stop(self) -> None:
        """The node died: no more turns of the loop, no more upstream bytes."""
        self.completed = True
        for timer in (self._wake, self._soon, self._announcer):
            if timer is not None:
                timer.cancel()
        for flow in self._upstream_flows:
            self.node.network.cancel(flow)
        self._upstream_flows.clear()

    def gone(self, peer_id: str) -> None:
        """The connection to ``peer_id`` failed: it is dead (membership) and gone here."""
        self.node.dead.add(peer_id)
        self._fed.pop(peer_id, None)
        self.sched.peer_gone(peer_id, self.engine.now)
        self.poke()

    # -- the loop -----------------------------------------------------------------------

    def poke(self) -> None:
        """Run the loop at this instant (once, however many events poke it)."""
        if not self.completed and self._soon is None:
            self._soon = self.engine.add(_Turn(self.engine.now, self))

    def step(self) -> None:
        """One turn of the download loop."""
        sched, now = self.sched, self.engine.now
        if self.completed or self.awaiting:
            return  # the answer (or its timeout) runs the loop again
        # The daemon awaits its first lookup before the first turn; later ones run beside
        # the loop, one at a time, each ``lookup_wait`` after the last answer
        # (``next_lookup`` is infinite while one is out). The loop awaits a lease answer
        # inline, then carries on with the same turn (``resumed``).
        resumed, self.resumed = self.resumed, False
        if now >= self.next_lookup and not self.solo:
            self.next_lookup = math.inf
            self._lookup()
            if not self.answered:
                self.awaiting = _LOOKUP
                return
        wanted = sched.wants_lease
        if wanted and now >= self.next_lease and not resumed:
            if self.node.leasing(besides=self):
                pass  # one lease request at a time: its answer pokes us
            elif not self.deferred and self.node.fetching_upstream(besides=self):
                self.deferred, self.next_lease = True, now + LEASE_DEFER
            else:
                self.next_lease = now + LEASE_RETRY
                self.awaiting = _LEASE
                self._lease()
                return
        if now - self.last_progress > STUCK_AFTER + self.answer_time and not sched.in_flight:
            self.upstream = range(self.layout.count)
            sched.set_upstream_range(0, self.layout.count)
        in_flight = sched.in_flight
        sched.tick(now)
        if sched.in_flight < in_flight:  # requests timed out: their pieces were forgotten
            self._fed = {}
        actions = sched.next_actions(now)
        if actions:  # (a turn with none makes no dict)
            asks: dict[str, list[int]] = {}  # one message per holder, in order
            for action in actions:
                if isinstance(action, RequestPiece):
                    indices = asks.get(action.peer_id)
                    if indices is None:  # (setdefault would make a list every time)
                        indices = asks[action.peer_id] = []
                    indices.append(action.index)
                elif isinstance(action, FetchUpstream):
                    self._fetch_upstream(action.indices)
                elif isinstance(action, CancelRequest):
                    self.cancels_ignored += 1
            for peer_id, indices in asks.items():
                self._request(peer_id, indices)
        if sched.done:
            self._complete()
            return
        # the daemon's loop looks at the clock at least every LOOKUP_INTERVAL
        wake, soonest = self._wake, min(self.next_lookup, now + LOOKUP_INTERVAL)
        if wake is not None and now < wake.time <= max(min(sched.quiet_until, soonest),
                                                       now + MIN_WAIT):
            return  # as below, with a bound no later than next_deadline(): no timer read
        deadline = min(sched.next_deadline() or math.inf, soonest)
        at = max(deadline, now + MIN_WAIT)
        if wake is not None and now < wake.time <= at:
            return  # an earlier turn is due anyway; it sets the next one
        if wake is not None:
            wake.cancel()
        self._wake = self.engine.add(_Turn(at, self))

    def _complete(self) -> None:
        self.completed = True
        self.node.held[self.blob.digest] |= 1 << (self.layout.count - 1)
        if self._announcer is not None:
            self._announcer.cancel()
            self._announcer = None
        self.announce()
        self.node.blob_done(self)

    # -- coordinator --------------------------------------------------------------------

    def _lookup(self) -> None:
        blob, name = self.blob, self.node.name
        target = self.coordinator
        if self.node.cluster.partitioned:  # every call queued on arrival, in its order
            self.lookup_sent = self.engine.now
            self.node.remote_call(target, _LOOKUP, blob, patience=LOOKUP_TIMEOUT)
            return
        coordinator = target.coordinator

        def query() -> object:
            return coordinator.lookup(blob.digest, blob.size, name, self.engine.now)

        self.lookup_sent = self.engine.now
        cost = target.call_cost(name, _LOOKUP, blob.digest, self.layout.count)
        self.node.call(target, query, self._peers, timeout=partial(self._unreachable, _LOOKUP),
                       cost=cost, patience=LOOKUP_TIMEOUT)

    def _answered(self, kind: str) -> None:
        """The answer to ``kind`` (or its timeout) came: the loop goes on if it waited."""
        if self.awaiting == kind:
            self.awaiting = None
            self.resumed = kind == _LEASE
        if kind == _LEASE:
            self._lease_answered()

    def _unreachable(self, kind: str, gone: bool) -> None:
        """A lookup or lease request went unanswered for ``RPC_TIMEOUT``. A slow
        coordinator is asked again later (the next lookup ``lookup_wait`` from now; the
        lease after ``LEASE_RETRY``); without a coordinator the download goes on alone,
        as the daemon's does (solo: upstream for what no known peer has)."""
        self._answered(kind)
        if self.completed:
            return
        if not gone:
            self.slow += 1
            if kind == _LOOKUP:
                self.lookup_time = self.engine.now - self.lookup_sent
                if not self.answered:  # the stuck clock starts now (as the daemon's)
                    self.answered, self.last_progress = True, self.engine.now
                self.next_lookup = self.engine.now + lookup_wait(
                    self.node.rng, self.node.limits.lookup_jitter)
            self.poke()
            return
        self.solo = True
        self.upstream = range(self.layout.count)
        self.sched.set_upstream_range(0, self.layout.count)
        self.lost += 1
        self.poke()

    def _peers(self, answer: object) -> None:
        assert isinstance(answer, PeerList)
        if not self._lookup_answered(answer.announced):
            return
        now, seen = self.engine.now, self.seen
        for holder in answer.holders:
            seen |= holder.bits
            self._feed(holder.node_id, holder.bits, holder.complete, now)
        me = self.node.name
        self._holders_taken(seen, any(lease.node_id != me for lease in answer.fetchers))

    def _peers_sent(self, ids: tuple[str, ...], bits: tuple[int, ...],
                    complete: tuple[bool, ...], fetchers: tuple[str, ...],
                    announced: int) -> None:
        """:meth:`_peers`, from another partition's coordinator (:func:`encode_answer`)."""
        if not self._lookup_answered(announced):
            return
        now, seen = self.engine.now, self.seen
        for node_id, holder_bits, whole in zip(ids, bits, complete, strict=True):
            seen |= holder_bits
            self._feed(node_id, holder_bits, whole, now)
        me = self.node.name
        self._holders_taken(seen, any(node_id != me for node_id in fetchers))

    def _lookup_answered(self, announced: int) -> bool:
        """A lookup's answer has come (``announced``: the pieces whose hashes its
        coordinator holds); whether the download still wants it."""
        self._answered(_LOOKUP)
        if self.completed:
            return False
        self.lookup_time = self.answer_time = self.engine.now - self.lookup_sent
        self.next_lookup = self.engine.now + lookup_wait(
            self.node.rng, self.node.limits.lookup_jitter, self.answer_time)
        self.hashed |= announced
        return True

    def _holders_taken(self, seen: int, fetcher: bool) -> None:
        """The holders a lookup told of were fed (``seen``: every piece held by one of
        them or earlier ones; ``fetcher``: another node fetches upstream)."""
        now = self.engine.now
        if seen != self.seen or fetcher or not self.answered:
            # the swarm makes progress, or someone else fetches upstream: not stuck
            self.seen, self.last_progress = seen, now
        self.answered = True
        self.poke()

    def _feed(self, peer_id: str, bits: int, complete: bool, now: float) -> None:
        """Tell the scheduler that ``peer_id`` holds ``bits`` (minus what it refused)."""
        fed = self._fed
        before = fed.get(peer_id)
        if before == bits or peer_id == self.node.name or peer_id in self.node.dead:
            return
        lacks = self._lacks(peer_id, now)
        bits &= ~lacks
        if before == bits:
            return
        fed[peer_id] = bits
        if complete and not lacks:
            self.sched.peer_update(peer_id, (), True, now)
        elif before is not None and bits & before == before:
            # Only new pieces since the last feed, and the scheduler's view is still
            # exactly what was fed (``_fed`` is cleared on refusals and timeouts):
            # ``peer_has`` of the difference leaves the scheduler in the state
            # ``peer_update`` of all of them would, at a fraction of the cost.
            self.sched.peer_has_bits(peer_id, bits & ~before, now)
        else:
            self.sched.peer_update_bits(peer_id, bits, now)

    def _lacks(self, peer_id: str, now: float) -> int:
        """The pieces ``peer_id`` refused as missing lately (a mask), dropping old ones."""
        lacks = self.refused_by.get(peer_id)
        if not lacks:
            return 0
        mask = 0
        for index, until in list(lacks.items()):
            if until > now:
                mask |= 1 << index
            else:
                del lacks[index]
        if not lacks:
            del self.refused_by[peer_id]
        return mask

    def _lease(self) -> None:
        blob, name = self.blob, self.node.name
        target = self.coordinator
        if self.node.cluster.partitioned:
            self.lease_asked = self.engine.now
            self.node.remote_call(target, _LEASE, blob)
            return
        coordinator = target.coordinator

        def query() -> object:
            return coordinator.request_lease(blob.digest, blob.size, name, self.engine.now)

        self.lease_asked = self.engine.now
        self.node.call(target, query, self._granted, timeout=partial(self._unreachable, _LEASE),
                       cost=target.call_cost(name, _LEASE, blob.digest, self.layout.count))

    @property
    def leasing(self) -> bool:
        """Whether a lease request is on its way (until its answer or its timeout)."""
        return self.lease_asked is not None

    def _lease_answered(self) -> None:
        self.lease_asked = None
        for other in self.node._active:  # downloads waiting for this answer to ask theirs
            if other is not self and not other.completed:
                other.poke()

    def _granted(self, answer: object) -> None:
        self._answered(_LEASE)
        if isinstance(answer, Lease) and not self.solo and not self.completed:
            self.upstream = range(answer.first_piece, answer.last_piece)
            self.sched.set_upstream_range(answer.first_piece, answer.last_piece)
        self.poke()

    def announce(self) -> None:
        """Send our snapshot of this blob to its coordinator (one-way)."""
        blob, node = self.blob, self.node
        bits = node.held[blob.digest]
        complete = self.sched.done
        target = self.coordinator
        if node.cluster.partitioned:
            node.remote_call(target, _ANNOUNCE, blob, (bits, complete))
            return
        coordinator = target.coordinator

        def query() -> object:
            return coordinator.announce(blob.digest, blob.size, node.name, node.name, bits,
                                        complete, {}, self.engine.now)

        node.call(target, query, None, cost=target.cpu_cost("announce", self.layout.count))

    def _announce_due(self) -> None:
        self._announcer = None
        if self.announce_due and not self.solo:
            self.announce_due = False
            self.announce()

    # -- pieces -------------------------------------------------------------------------

    def _request(self, peer_id: str, indices: list[int]) -> None:
        holder = self.node.cluster.nodes[peer_id]
        delay = self.node.network.latency(self.node.host, holder.host)
        if not self.node.here(holder):
            self.node.cluster.post_requests(self.engine.now + delay, holder, self.node,
                                            self.blob.digest, indices)
            return
        self.engine.add(_Requests(self.engine.now + delay, holder, self.node,
                                  self.blob.digest, indices))

    def from_peer(self, peer_id: str, index: int, bits: int) -> None:
        """Piece ``index`` arrived from ``peer_id`` (it always verifies here), after the
        pieces it held when it began to send it (``bits``, its ``HAVE``)."""
        now = self.engine.now
        if bits & ~self.seen:
            self.seen, self.last_progress = self.seen | bits, now
        # only pieces whose hash we know: those announced by our last lookup's time
        complete = bits == (1 << self.layout.count) - 1
        self._feed(peer_id, bits & self.hashed, complete and bits == self.hashed, now)
        self.sched.piece_received(peer_id, index, True, now)
        self._held(index)

    def refused(self, peer_id: str, index: int, busy: bool) -> None:
        """``peer_id`` refused ``index``: busy, or it does not hold it."""
        if busy:
            self.sched.busy(peer_id, index, self.engine.now)
        else:
            self.refused_by.setdefault(peer_id, {})[index] = self.engine.now + MISSING_RETRY
            fed = self._fed.get(peer_id)
            if fed is not None:  # asked again, once the refusal is old enough
                self._fed[peer_id] = fed & ~(1 << index)
            self.sched.refused(peer_id, index, self.engine.now)
        self.poke()

    def _fetch_upstream(self, indices: tuple[int, ...]) -> None:
        runs: list[list[int]] = []
        for i in indices:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        if not runs:
            return
        cluster, node = self.node.cluster, self.node
        if cluster.registry.part != node.host.part:  # the registry's partition sends them
            delay = node.network.latency(node.host, cluster.registry) + cluster.registry_latency
            cluster.post(self.engine.now + delay, cluster.registry.part, "", "upstream",
                         (node.name, self.blob.digest, self.blob.size, runs))
            return
        self._upstream_run(runs, 0, first=True)

    def _upstream_run(self, runs: list[list[int]], at: int, *, first: bool) -> None:
        """Fetch ``runs[0][at]``, then the rest of that run, then the following runs."""
        cluster, node = self.node.cluster, self.node
        registry, index = cluster.registry, runs[0][at]

        def got() -> None:
            del self._upstream_flows[flow]
            self.upstream_got(index)
            if at + 1 < len(runs[0]):
                self._upstream_run(runs, at + 1, first=False)
            elif len(runs) > 1:
                self._upstream_run(runs[1:], 0, first=True)

        flow: Flow

        def begin() -> None:
            nonlocal flow
            if node.crashed:
                return
            flow = node.network.transfer(registry, node.host, self.layout.length(index), got,
                                         tag="registry")
            self._upstream_flows[flow] = None

        if first:  # a new Range request: to the registry, and its time to answer
            delay = node.network.latency(node.host, registry) + cluster.registry_latency
            self.engine.schedule(delay, begin)
        else:
            begin()

    def upstream_got(self, index: int) -> None:
        """Piece ``index`` came from the registry."""
        self.sched.upstream_received(index, self.engine.now)
        self._held(index)

    def _held(self, index: int) -> None:
        self.last_progress = self.engine.now
        if index < self.layout.count - 1 or self.sched.done:
            # the daemon serves (and announces) the last piece only once the whole blob
            # matched its digest: at the end of the download
            self.node.held[self.blob.digest] |= 1 << index
        if self.completed:
            return  # a late copy (endgame duplicate): nothing to tell
        self.announce_due = True
        if self._announcer is None:
            # no more often than the coordinator answers lookups, but a fetcher's at once
            # (as the daemon)
            delay = ANNOUNCE_DELAY if self.sched.fetching_upstream \
                else max(ANNOUNCE_DELAY, self.lookup_time)
            self._announcer = self.engine.schedule(delay, self._announce_due)
        self.poke()
