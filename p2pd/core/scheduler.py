"""Which piece to ask from which peer: one node's download of one blob, sans-IO.

How it works. The caller (daemon or simulation) feeds events in — a peer's holdings,
pieces that arrived verified or corrupt, refusals, lost peers, upstream results, time
(:meth:`~Scheduler.tick`) — and asks :meth:`~Scheduler.next_actions` what to do:
:class:`RequestPiece`, :class:`CancelRequest`, :class:`FetchUpstream`. Each piece is
*pending* (wanted, not asked), *flying* (asked from peers and/or upstream) or *held*.

Piece choice: **rarest first, then the streaming window, then a per-node random order.**
Of the pending pieces a peer holds, the ones fewest known peers hold go first. Among
equally rare ones, the window of ``sequential_window`` pieces from the first missing
piece goes first, front first — if at least two peers hold them. Other ties follow a
permutation of the pieces drawn once from ``rng``. Why: rarest first keeps the swarm's
copies diverse so peers can trade instead of queueing on one source; the window lets the
in-order stream to containerd advance during the download rather than jump at the end.
The window only breaks ties, and not for pieces a single peer holds: when every node
starts at once they all see the same single source, and a front preference would make
them all ask it for the same pieces, leaving them nothing to trade. The random order is
per node, so nodes with the same view still ask for different pieces.

Limits: at most ``max_in_flight`` requests at once over all peers and
``max_in_flight_per_peer`` per peer (a timeout halves a peer's allowance, each piece it
delivers adds one back; :class:`~p2pd.core.peerscore.InFlight` keeps that book); when
room frees, peers with allowance left take turns. A peer that refuses as *busy* (no
upload slot) still holds the piece, but is asked nothing for ``busy_backoff`` (±50 %, so
askers that were refused together do not come back together). Only pieces the peer is
known to hold; never a peer blamed for a bad piece of this blob or banned in the shared
:class:`~p2pd.core.peerscore.PeerScores`; one request per piece except in the *endgame*
(at most ``endgame_threshold`` pieces missing, nothing pending that a peer could be
asked for): flying pieces are asked again from other holders, up to ``endgame_copies``
copies, and the first copy in cancels the rest. The default threshold
(:func:`endgame_size`) is an eighth of the blob, at least 1 and at most 8 pieces: a copy
costs the receiver's downlink as much as the original and holders send it whole (they do
not act on cancels), so a wide endgame on a small blob is paid in full (simulated, 16 nodes on
4 MiB/s links, blobs of 8 pieces: 1.35 x the image received and a p50 30 % later with all
8 as endgame than with the last one). Timeouts are progress-based: a request
expires ``request_timeout`` after it was sent or last progressed; that peer is then
taken not to hold the piece (as if it refused) until it announces it again, so the piece
goes elsewhere.

Upstream: pending pieces no usable peer holds are candidates (:meth:`wanted_upstream`);
only those in the upstream range (our lease, :meth:`set_upstream_range`) are fetched,
front first (contiguous ``Range`` requests; the stream needs the front), at most
``upstream_batch`` at once, topped up when half are in. The rest wait for peers: another
node holds their lease. A failed piece waits ``upstream_retry_delay`` before the next try.

Speed: piece sets are ints used as bitsets (bit = the piece's random rank), pending
pieces sit in buckets by availability, so a pick is a few ANDs; counts change
incrementally and complete peers are one shared count. Only peers whose situation
changed are reconsidered, and one holding nothing pending (nor, in the endgame, anything
that may take another copy) is passed over with one AND. A :meth:`~Scheduler.tick` before
the earliest timeout, rest or hold returns at once (a bound kept as they are set).
Iteration is over dicts and ints, never sets of peer ids, so a seed plus a sequence of
events determines the actions.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from p2pd.core.draws import shuffle
from p2pd.core.peerscore import InFlight, PeerId, PeerScores
from p2pd.core.pieces import PieceLayout

_PENDING: Final = 0
_FLYING: Final = 1
_HELD: Final = 2
_WINDOW_MIN_HOLDERS: Final = 2


class _PeerPiece:
    """An action about piece ``index`` and peer ``peer_id``: immutable, equal to the
    same action with the same fields, as a frozen dataclass would be.

    Not a dataclass: the scheduler makes one per request, and in the compiled simulation
    (:mod:`simulations.compiled`) a dataclass's generated ``__init__`` is interpreted
    Python, called from compiled code (3,000 instructions a request, 4 % of a run),
    where this one is compiled with the rest of the module."""

    __slots__ = ("index", "peer_id")

    def __init__(self, peer_id: PeerId, index: int) -> None:
        self.peer_id: Final = peer_id
        self.index: Final = index

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, _PeerPiece) and \
            other.peer_id == self.peer_id and other.index == self.index

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.peer_id, self.index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(peer_id={self.peer_id!r}, index={self.index!r})"


class RequestPiece(_PeerPiece):
    """Ask ``peer_id`` for piece ``index``."""

    __slots__ = ()


class CancelRequest(_PeerPiece):
    """Withdraw the request for ``index`` from ``peer_id`` (it came from elsewhere)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class FetchUpstream:
    """Fetch these pieces from the registry (ascending; contiguous runs make one ``Range``)."""

    indices: tuple[int, ...]


Action = RequestPiece | CancelRequest | FetchUpstream


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """A snapshot of one blob's download.

    ``in_flight`` counts requests to peers awaiting an answer; ``duplicates`` endgame
    requests for a piece already asked elsewhere; ``redundant`` pieces that arrived when
    already held (endgame losers, late answers); ``blamed`` the peers that sent a bad piece.
    """

    held: int
    in_flight: int
    upstream_in_flight: int
    requests_sent: int
    duplicates: int
    cancels: int
    redundant: int
    timeouts: int
    refusals: int
    bad_pieces: int
    blamed: tuple[PeerId, ...]
    pieces_from_peers: int
    pieces_from_upstream: int
    bytes_from_peers: int
    bytes_from_upstream: int
    endgame: bool
    done: bool


def _bits(mask: int) -> Iterator[int]:
    """Positions of the set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _discard(peers: dict[PeerId, None], peer_id: PeerId) -> None:
    """Remove ``peer_id`` from ``peers`` if there. (Compiled, ``dict.pop(key, None)`` is
    a generic method call; ``in`` and ``del`` are direct.)"""
    if peer_id in peers:
        del peers[peer_id]  # noqa: RUF051 (see above)


def endgame_size(pieces: int) -> int:
    """How many missing pieces a blob of ``pieces`` may ask twice for by default."""
    return max(1, min(8, pieces // 8))


class Scheduler:
    """The piece scheduler of one blob on one node (see the module docstring)."""

    def __init__(
        self, layout: PieceLayout, *, rng: random.Random, max_in_flight_per_peer: int = 4,
        request_timeout: float = 10.0, endgame_threshold: int | None = None,
        ban_after: int = 3, have: Iterable[int] = (), scores: PeerScores | None = None,
        sequential_window: int = 8, endgame_copies: int = 2, upstream_batch: int = 8,
        upstream_retry_delay: float = 1.0, upstream_range: range | None = None,
        max_in_flight: int | None = None, busy_backoff: float = 0.25,
    ) -> None:
        """``scores`` is shared between schedulers; without it a private one is made with
        ``ban_after`` (which is otherwise ignored). ``have`` lists pieces already held."""
        n = layout.count
        if endgame_copies < 1 or upstream_batch < 1:
            raise ValueError("endgame_copies and upstream_batch must be at least 1")
        if upstream_retry_delay < 0 or sequential_window < 0:
            raise ValueError("upstream_retry_delay and sequential_window cannot be negative")
        self.layout = layout
        self._n, self._full = n, (1 << n) - 1
        self._asked = InFlight(max_per_peer=max_in_flight_per_peer, timeout=request_timeout)
        self._max_total = max_in_flight if max_in_flight is not None else 1 << 30
        if self._max_total < 1:
            raise ValueError("max_in_flight must be at least 1")
        if busy_backoff < 0:
            raise ValueError("busy_backoff cannot be negative")
        self._rng, self._backoff = rng, busy_backoff
        self._resting: dict[PeerId, float] = {}  # busy peers: not asked before
        self._rest_heap: list[tuple[float, PeerId]] = []
        # tick has nothing to do before this: at most the earliest request timeout, end
        # of a rest or upstream hold (lowered as they are set, made exact by each tick
        # that runs); most turns come before it, and tick then reads none of the three
        self._tick_at = math.inf
        self._threshold = endgame_size(n) if endgame_threshold is None else endgame_threshold
        self._copies, self._batch = endgame_copies, upstream_batch
        self._window, self._retry = sequential_window, upstream_retry_delay
        self._scores = PeerScores(ban_after=ban_after) if scores is None else scores
        self._seen_bans = self._scores.version
        # lists, not arrays: the compiled simulation reads a list's item directly and an
        # array's through Python's generic item protocol (these are read on every piece
        # a peer is known to gain); their small ints are shared objects
        self._order = list(range(n))
        shuffle(rng, self._order)  # rank -> piece: this node's tie-break order
        self._rank = [0] * n
        for rank, index in enumerate(self._order):
            self._rank[index] = rank
        self._state = [_PENDING] * n
        self._partial = [0] * n  # usable peers holding it, seeds not counted
        self._seeds = 0  # usable peers holding every piece
        self._buckets = [self._full]  # pending pieces (rank bits) by partial count
        self._pending_bits = self._full  # pending pieces (rank bits): the buckets' union
        self._dup_bits = 0  # in the endgame: flying pieces that may take a copy (rank bits)
        self._orphans = self._full  # pending pieces with partial count 0 (index bits)
        self._pending, self._missing, self._held, self._cursor = n, self._full, 0, 0
        self._upstream = 0  # pieces asked from upstream (index bits)
        self._hold: dict[int, float] = {}  # failed upstream: not again before
        self._hold_mask = self._range_mask = 0
        self._masks: dict[PeerId, int] = {}  # usable peers: what they hold (rank bits)
        self._blamed: dict[PeerId, None] = {}
        self._dirty: dict[PeerId, None] = {}  # to reconsider in next_actions
        self._idle: dict[PeerId, None] = {}  # allowance left but nothing to ask
        self._idle_bits = 0  # holds at least every piece an idle peer holds (rank bits)
        self._starved: dict[PeerId, None] = {}  # allowance left, held back by max_in_flight
        self._outbox: list[Action] = []
        self._sent = self._dups = self._cancels = self._redundant = 0
        self._timeouts = self._refusals = self._bad = 0
        self._from = [0, 0, 0, 0]  # pieces from peers, upstream; bytes from peers, upstream
        for index in dict.fromkeys(have):
            self._check(index)
            self._deliver(index, None)
        if upstream_range is not None:
            self.set_upstream_range(upstream_range.start, upstream_range.stop)

    # -- inputs -------------------------------------------------------------------------

    def peer_update(
        self, peer_id: PeerId, pieces: Iterable[int], complete: bool, now: float
    ) -> None:
        """``peer_id`` holds exactly ``pieces`` (every piece if ``complete``)."""
        if self._usable(peer_id):
            self._set_mask(peer_id, self._full if complete else self._mask_of(pieces))

    def peer_has(self, peer_id: PeerId, pieces: Iterable[int], now: float) -> None:
        """``peer_id`` now also holds ``pieces`` (a HAVE); cheaper than a full update."""
        if self._usable(peer_id):
            self._set_mask(peer_id, self._masks.get(peer_id, 0) | self._mask_of(pieces))

    def peer_update_bits(self, peer_id: PeerId, bits: int, now: float) -> None:
        """:meth:`peer_update` from a mask: ``peer_id`` holds exactly the pieces whose
        bits are set in ``bits`` (bit ``i``: piece ``i``)."""
        if self._usable(peer_id):
            self._set_mask(peer_id, self._ranked(bits))

    def peer_has_bits(self, peer_id: PeerId, bits: int, now: float) -> None:
        """:meth:`peer_has` from a mask: ``peer_id`` now also holds the pieces of ``bits``."""
        if self._usable(peer_id):
            self._set_mask(peer_id, self._masks.get(peer_id, 0) | self._ranked(bits))

    def peer_gone(self, peer_id: PeerId, now: float) -> None:
        """The connection to ``peer_id`` is lost; its requests go back to the queue."""
        if peer_id in self._masks:
            self._remove_peer(peer_id, cancel=False)
            self._outbox = [
                a for a in self._outbox if not isinstance(a, CancelRequest) or a.peer_id != peer_id
            ]

    def piece_received(self, peer_id: PeerId, index: int, ok: bool, now: float) -> None:
        """Piece ``index`` came from ``peer_id``; ``ok`` is whether its sha256 matched.

        A bad piece blames the peer: never asked again for this blob, its other requests
        cancelled, one offence recorded in the shared scores. A good piece that arrives
        late (after a timeout or cancel) is still taken.
        """
        self._check(index)
        if self._retire(peer_id, index) and ok:
            self._asked.delivered(peer_id)
        if ok:
            self._deliver(index, False)
            return
        self._bad += 1
        self._settle(index)
        if peer_id not in self._blamed:
            self._blamed[peer_id] = None
            self._scores.record_offence(peer_id)
            if peer_id in self._masks:
                self._remove_peer(peer_id, cancel=True)

    def refused(self, peer_id: PeerId, index: int, now: float) -> None:
        """``peer_id`` does not hold ``index``: forget that it does; ask elsewhere."""
        self._check(index)
        if peer_id in self._masks:
            self._refusals += 1
            self._retire(peer_id, index)
            self._forget_piece(peer_id, index)

    def busy(self, peer_id: PeerId, index: int, now: float) -> None:
        """``peer_id`` holds ``index`` but had no upload slot: ask others, and ask it
        nothing for ``busy_backoff`` (±50 %, drawn from ``rng``)."""
        self._check(index)
        if peer_id in self._masks:
            self._refusals += 1
            self._asked.remove(peer_id, index)  # (_retire would mark it dirty: undone below)
            self._settle(index)
            until = now + self._backoff * (0.5 + self._rng.random())
            if until > self._resting.get(peer_id, 0.0):
                self._resting[peer_id] = until
                heapq.heappush(self._rest_heap, (until, peer_id))
                if until < self._tick_at:
                    self._tick_at = until
            _discard(self._dirty, peer_id)
            _discard(self._idle, peer_id)
            _discard(self._starved, peer_id)

    def progress(self, peer_id: PeerId, index: int, now: float) -> None:
        """Bytes of ``index`` are arriving from ``peer_id``: restart its timeout."""
        self._asked.progress(peer_id, index, now)

    def upstream_received(self, index: int, now: float) -> None:
        """Piece ``index`` came from the registry, verified."""
        self._check(index)
        self._upstream &= ~(1 << index)
        self._deliver(index, True)

    def upstream_failed(self, index: int, now: float) -> None:
        """Fetching ``index`` from the registry failed; retry it after a delay."""
        self._check(index)
        if self._upstream >> index & 1:
            self._upstream ^= 1 << index
            if self._state[index] != _HELD:
                self._hold[index] = until = now + self._retry
                self._hold_mask |= 1 << index
                if until < self._tick_at:
                    self._tick_at = until
                self._settle(index)

    def set_max_in_flight(self, limit: int) -> None:
        """Change ``max_in_flight`` (the node shares one budget among its downloads).
        Lowering it recalls nothing: new requests wait until enough answers are in."""
        if limit < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._max_total = limit

    def set_upstream_range(self, start: int, stop: int) -> None:
        """Allow fetching pieces ``start <= i < stop`` from upstream (our lease); replaces
        the previous range. Narrowing it does not recall pieces already asked for."""
        if not 0 <= start <= stop <= self._n:
            raise ValueError(f"upstream range {start}..{stop} outside 0..{self._n}")
        self._range_mask = ((1 << stop) - 1) ^ ((1 << start) - 1)

    def tick(self, now: float) -> None:
        """Expire requests without progress for ``request_timeout``; end rests and
        upstream holds. Before :attr:`quiet_until` there is nothing to do, and nothing is
        read."""
        if now < self._tick_at:
            return
        asked = self._asked
        if asked.due(now):
            for peer_id, index in asked.expire(now):
                self._timeouts += 1
                self._scores.record_timeout(peer_id)
                self._dirty[peer_id] = None
                self._forget_piece(peer_id, index)
        heap, resting = self._rest_heap, self._resting
        while heap and heap[0][0] <= now:
            until, peer_id = heapq.heappop(heap)
            if resting.get(peer_id) == until:
                del resting[peer_id]
                if peer_id in self._masks:
                    self._dirty[peer_id] = None
        if self._hold:
            for index, when in list(self._hold.items()):
                if when <= now:
                    del self._hold[index]
                    self._hold_mask ^= 1 << index
        deadline = self.next_deadline()
        self._tick_at = math.inf if deadline is None else deadline

    # -- outputs ------------------------------------------------------------------------

    def next_actions(self, now: float) -> list[Action]:
        """What to do now: cancels queued by earlier events, new requests, upstream fetches."""
        if self._scores.version != self._seen_bans:
            self._seen_bans = self._scores.version
            for peer_id in [p for p in self._masks if self._scores.is_banned(p)]:
                self._remove_peer(peer_id, cancel=True)
        actions, self._outbox = self._outbox, []
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            for peer_id in dirty:
                if peer_id in self._masks:
                    self._fill(peer_id, now, False, actions)
        if self.in_endgame:
            self._dup_bits = self._duplicable()
            self._fill_endgame(now, actions)
        elif self._pending and self._starved and len(self._asked) < self._max_total:
            for peer_id in list(self._starved):  # room freed: peers the cap held back
                self._fill(peer_id, now, False, actions)
                if len(self._asked) >= self._max_total:
                    break
        if self._range_mask and not self._seeds:  # (most turns: no upstream range)
            flying_up = self._upstream.bit_count()
            chosen: list[int] = []
            if flying_up * 2 <= self._batch:
                for index in _bits(self._orphans & self._range_mask & ~self._hold_mask):
                    if flying_up + len(chosen) >= self._batch:
                        break
                    chosen.append(index)
            for index in chosen:
                self._upstream |= 1 << index
                self._settle(index)
            if chosen:
                actions.append(FetchUpstream(tuple(chosen)))
        return actions

    @property
    def in_flight(self) -> int:
        """Requests to peers awaiting an answer."""
        return len(self._asked)

    @property
    def wants_lease(self) -> bool:
        """Whether pieces no usable peer holds lie outside our upstream range (what
        :meth:`wanted_upstream` tells, without listing them)."""
        return not self._seeds and bool(self._orphans & ~self._range_mask)

    @property
    def fetching_upstream(self) -> bool:
        """Whether pieces of our upstream range are still to come (not held yet)."""
        return bool(self._missing & self._range_mask)

    def wanted_upstream(self) -> tuple[int, ...]:
        """Pending pieces that no usable peer holds (whether or not in our upstream range)."""
        return () if self._seeds else tuple(_bits(self._orphans))

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (``None``: nothing is timed)."""
        deadline = self._asked.next_deadline()  # the earliest of three, allocating nothing
        if self._rest_heap:
            rest = self._rest_heap[0][0]
            if deadline is None or rest < deadline:
                deadline = rest
        if self._hold:
            hold = min(self._hold.values())
            if deadline is None or hold < deadline:
                deadline = hold
        return deadline

    @property
    def quiet_until(self) -> float:
        """No request times out, rest ends or upstream hold ends before this (infinite:
        none is timed): a lower bound on :meth:`next_deadline`, read without looking at
        the timers (it is exact after a :meth:`tick` that had something to do)."""
        return self._tick_at

    @property
    def done(self) -> bool:
        """Whether every piece is held."""
        return self._held == self._n

    @property
    def contiguous(self) -> int:
        """How many pieces from the front are held (what can be streamed in order)."""
        return self._cursor

    @property
    def in_endgame(self) -> bool:
        """Few pieces missing and nothing pending that any peer could be asked for."""
        if not 0 < self._n - self._held <= self._threshold:
            return False
        return self._pending == (0 if self._seeds else self._orphans.bit_count())

    def is_held(self, index: int) -> bool:
        """Whether piece ``index`` is held."""
        self._check(index)
        return self._state[index] == _HELD

    def known(self, peer_id: PeerId) -> frozenset[int]:
        """The pieces ``peer_id`` is believed to hold (empty if unknown, blamed or banned)."""
        return frozenset(self._order[r] for r in _bits(self._masks.get(peer_id, 0)))

    def statistics(self) -> SchedulerStatistics:
        """The current state and counters."""
        return SchedulerStatistics(
            held=self._held, in_flight=len(self._asked),
            upstream_in_flight=self._upstream.bit_count(), requests_sent=self._sent,
            duplicates=self._dups, cancels=self._cancels, redundant=self._redundant,
            timeouts=self._timeouts, refusals=self._refusals, bad_pieces=self._bad,
            blamed=tuple(self._blamed), pieces_from_peers=self._from[0],
            pieces_from_upstream=self._from[1], bytes_from_peers=self._from[2],
            bytes_from_upstream=self._from[3], endgame=self.in_endgame, done=self.done,
        )

    # -- internals: peers ---------------------------------------------------------------

    def _check(self, index: int) -> None:
        if not 0 <= index < self._n:
            raise IndexError(f"piece {index} out of range 0..{self._n - 1}")

    def _usable(self, peer_id: PeerId) -> bool:
        if not self._blamed and not self._scores.version:  # no one blamed, no one banned
            return True
        return peer_id not in self._blamed and not self._scores.is_banned(peer_id)

    def _mask_of(self, pieces: Iterable[int]) -> int:
        rank, mask = self._rank, 0
        for index in pieces:
            self._check(index)
            mask |= 1 << rank[index]
        return mask

    def _ranked(self, bits: int) -> int:
        """Piece bits (bit ``i``: piece ``i``) as rank bits."""
        if bits < 0 or bits >> self._n:
            raise ValueError(f"piece mask {bits:#x} outside 0..{self._n - 1}")
        rank, mask = self._rank, 0
        while bits:
            low = bits & -bits
            mask |= 1 << rank[low.bit_length() - 1]
            bits ^= low
        return mask

    def _set_mask(self, peer_id: PeerId, new: int) -> None:
        """Replace what ``peer_id`` holds, keeping the availability counts right."""
        old, full = self._masks.get(peer_id, 0), self._full
        self._masks[peer_id] = new
        if old == new:
            return
        if peer_id in self._idle:
            self._idle_bits |= new
        if new & ~old and self._asked.free(peer_id):
            self._dirty[peer_id] = None
        old_part, new_part = (0 if old == full else old), (0 if new == full else new)
        self._seeds += (new == full) - (old == full)
        if old_part & ~new_part:
            self._count(old_part & ~new_part, -1)
        if new_part & ~old_part:
            self._count(new_part & ~old_part, 1)

    def _forget_piece(self, peer_id: PeerId, index: int) -> None:
        """``peer_id`` is taken not to hold ``index`` any more; ask someone else."""
        self._set_mask(peer_id, self._masks[peer_id] & ~(1 << self._rank[index]))
        self._settle(index)

    def _retire(self, peer_id: PeerId, index: int) -> bool:
        """Forget the request for ``index`` from ``peer_id`` (caller settles the piece)."""
        if not self._asked.remove(peer_id, index):
            return False
        if peer_id in self._masks:
            self._dirty[peer_id] = None
        return True

    def _remove_peer(self, peer_id: PeerId, *, cancel: bool) -> None:
        _discard(self._idle, peer_id)
        _discard(self._starved, peer_id)
        _discard(self._dirty, peer_id)
        indices = self._asked.forget(peer_id)
        self._set_mask(peer_id, 0)
        del self._masks[peer_id]
        _discard(self._dirty, peer_id)
        for index in indices:
            if cancel:
                self._outbox.append(CancelRequest(peer_id, index))
            self._settle(index)

    # -- internals: pieces --------------------------------------------------------------

    def _count(self, ranks: int, delta: int) -> None:
        """One more (``delta`` 1) or one fewer (-1) usable peer holds each piece of
        ``ranks`` (rank bits): their partial counts change, and pending ones move to
        their new bucket. (One loop over the bits with everything in locals: this runs
        for every piece a peer is learnt to hold.)"""
        order, partial, state, buckets = self._order, self._partial, self._state, self._buckets
        orphans = self._orphans
        while ranks:
            bit = ranks & -ranks  # the piece's rank bit
            ranks ^= bit
            index = order[bit.bit_length() - 1]
            count = partial[index]
            partial[index] = count + delta
            if state[index] == _PENDING:  # move it to its new bucket
                buckets[count] ^= bit
                if count + delta == len(buckets):
                    buckets.append(0)
                buckets[count + delta] |= bit
                if not count or not count + delta:
                    orphans ^= 1 << index
        self._orphans = orphans

    def _unpend(self, index: int) -> None:
        count, buckets, bit = self._partial[index], self._buckets, 1 << self._rank[index]
        buckets[count] ^= bit
        self._pending_bits ^= bit
        while len(buckets) > 1 and not buckets[-1]:
            buckets.pop()
        if not count:
            self._orphans ^= 1 << index
        self._pending -= 1
        self._state[index] = _FLYING

    def _pend(self, index: int) -> None:
        count, buckets, bit = self._partial[index], self._buckets, 1 << self._rank[index]
        while len(buckets) <= count:  # (not extend([0] * ...): a list made every time)
            buckets.append(0)
        buckets[count] |= bit
        self._pending_bits |= bit
        if not count:
            self._orphans |= 1 << index
        self._pending += 1
        self._state[index] = _PENDING
        if not self._idle:
            self._idle_bits = 0
        elif self._idle_bits & bit:  # some idle peer may hold it: it can ask for it now
            for peer_id in self._idle:
                if self._masks[peer_id] & bit:
                    self._dirty[peer_id] = None

    def _settle(self, index: int) -> None:
        """Make ``index`` pending or flying according to its requests."""
        state = self._state[index]
        flying = index in self._asked or self._upstream >> index & 1
        if flying and state == _PENDING:
            self._unpend(index)
        elif not flying and state == _FLYING:
            self._pend(index)

    def _deliver(self, index: int, upstream: bool | None) -> None:
        if self._state[index] == _HELD:
            self._redundant += 1
            return
        if self._state[index] == _PENDING:
            self._unpend(index)
        self._state[index] = _HELD
        self._missing ^= 1 << index
        self._held += 1
        while self._cursor < self._n and self._state[self._cursor] == _HELD:
            self._cursor += 1
        if upstream is not None:
            self._from[int(upstream)] += 1
            self._from[2 + int(upstream)] += self.layout.length(index)
        for peer_id in self._asked.askers(index):  # endgame: the other copies
            self._retire(peer_id, index)
            self._outbox.append(CancelRequest(peer_id, index))
            self._cancels += 1

    def _fill(self, peer_id: PeerId, now: float, endgame: bool, out: list[Action]) -> None:
        """Ask ``peer_id`` for pieces up to its allowance and ``max_in_flight``."""
        if peer_id in self._resting:
            return
        held_back = self._ask(peer_id, now, endgame, out)
        _discard(self._idle, peer_id)
        _discard(self._starved, peer_id)
        self._requeue(peer_id, held_back)

    def _requeue(self, peer_id: PeerId, held_back: bool) -> None:
        """Put ``peer_id``, if it has allowance left, at the back of the starved queue
        (``held_back`` by ``max_in_flight``) or the idle one: such peers take turns."""
        if self._asked.free(peer_id):
            if held_back:
                self._starved[peer_id] = None
            else:
                self._idle[peer_id] = None
                self._idle_bits |= self._masks[peer_id]

    def _ask(self, peer_id: PeerId, now: float, endgame: bool, out: list[Action]) -> bool:
        """:meth:`_fill`'s requests; whether ``max_in_flight`` held the peer back."""
        mask, asked = self._masks[peer_id], self._asked
        wanted = self._pending_bits | (self._dup_bits if endgame else 0)
        # a peer holding nothing it could be asked for skips the loop, which would find
        # so piece by piece (unless the cap holds it back: then it waits among the starved)
        tries = asked.free(peer_id) if mask & wanted or len(asked) >= self._max_total else 0
        for _ in range(tries):
            if len(asked) >= self._max_total:
                return True
            index = self._pick(mask)
            if index is None and endgame:
                index = self._pick_duplicate(peer_id, mask)
                self._dups += index is not None
            if index is None:
                break
            asked.add(peer_id, index, now)
            if now + asked.timeout < self._tick_at:
                self._tick_at = now + asked.timeout
            if self._state[index] == _PENDING:
                self._unpend(index)
            self._sent += 1
            out.append(RequestPiece(peer_id, index))
        return False

    def _fill_endgame(self, now: float, out: list[Action]) -> None:
        """:meth:`_fill` (endgame) every idle, then every starved peer, in turn.

        The same as calling it for each, but for how the two queues are rebuilt: each
        peer filled moves to the back of the one it ends in, so they end in the order
        visited (after the resting, which are not filled). Endgame turns visit dozens of
        peers that hold nothing wanted, and taking each out of its queue and putting it
        back cost more than asking it; such a peer goes back to the idle queue here, as
        :meth:`_ask` and :meth:`_requeue` would put it, without calling them."""
        idle, starved, resting = self._idle, self._starved, self._resting
        if not starved and not self._idle_bits & (self._pending_bits | self._dup_bits) \
                and len(self._asked) < self._max_total:
            # no idle peer holds anything wanted (``_idle_bits`` holds all they hold), and
            # none rests (a busy refusal takes a peer out of the queues; it comes back
            # only when filled): the loop would ask nothing and leave the queue as it is
            return
        order = [*idle, *starved]
        self._idle = {p: None for p in idle if p in resting}
        self._starved = {p: None for p in starved if p in resting}
        masks, asked = self._masks, self._asked
        for peer_id in order:
            if peer_id in resting:
                continue
            mask = masks[peer_id]
            if mask & (self._pending_bits | self._dup_bits) or len(asked) >= self._max_total:
                self._requeue(peer_id, self._ask(peer_id, now, True, out))
            elif asked.free(peer_id):  # nothing to ask it: _ask would find so; idle
                self._idle[peer_id] = None
                self._idle_bits |= mask

    def _pick(self, mask: int) -> int | None:
        """The pending piece to ask a peer holding ``mask`` for: rarest, window, rank."""
        for count, bucket in enumerate(self._buckets):  # noqa: B007 (used after the loop)
            found = bucket & mask
            if found:
                break
        else:
            return None
        if count + self._seeds >= _WINDOW_MIN_HOLDERS:
            state, partial, rank = self._state, self._partial, self._rank
            for index in range(self._cursor, min(self._cursor + self._window, self._n)):
                if not state[index] and partial[index] == count and mask >> rank[index] & 1:
                    return index
        return self._order[(found & -found).bit_length() - 1]

    def _duplicable(self) -> int:
        """The flying pieces with fewer than ``endgame_copies`` copies on their way (rank
        bits): all that :meth:`_pick_duplicate` may choose from, whatever the peer."""
        bits, rank, state, copies = 0, self._rank, self._state, self._copies
        for index in _bits(self._missing):
            if state[index] == _FLYING and \
                    len(self._asked.askers(index)) + (self._upstream >> index & 1) < copies:
                bits |= 1 << rank[index]
        return bits

    def _pick_duplicate(self, peer_id: PeerId, mask: int) -> int | None:
        """In the endgame: the flying piece with the fewest copies that the peer can add."""
        best, best_key = None, (0, 0)
        for index in _bits(self._missing):
            rank = self._rank[index]
            if self._state[index] != _FLYING or not mask >> rank & 1:
                continue
            if self._asked.asked(peer_id, index):
                continue
            copies = len(self._asked.askers(index)) + (self._upstream >> index & 1)
            if copies < self._copies and (best is None or (copies, rank) < best_key):
                best, best_key = index, (copies, rank)
        return best
