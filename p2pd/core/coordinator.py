"""The soft state a blob's coordinator keeps: who holds which pieces, who fetches upstream.

A node coordinates the blobs whose rendezvous order it heads (:mod:`p2pd.core.membership`).
Nothing is durable: a new coordinator rebuilds the state from the announcements nodes
repeat, and a lost lease costs at most ``lease_ttl`` of waiting.

How it works, per blob (a swarm, keyed by digest *and* size, so a node that reports a
wrong size only ever joins a swarm of its own):

- Holders. An announcement replaces the node's snapshot of its pieces (bit ``i`` of a
  bitfield = piece ``i``): repeating it is harmless and doubles as a heartbeat. Holders
  silent for ``holder_ttl`` are dropped. Per-piece holder counts are kept up to date.
- Lookup: a random sample of complete holders, then partial holders greedily by the
  rarest pieces they add that the asker lacks (ties at random), out of ``4 x free slots``
  sampled plus the fetchers (who have the newest pieces), so it costs the same for 10
  holders or 10,000. Rarity counts supply only: the asker is recorded as interested, but
  all askers want every piece, so demand cannot reorder pieces.
- Leases. Pieces are cut into equal segments (``max_fetchers`` for blobs larger than
  ``split_threshold``, else one). A lease goes to the asker for the first run of pieces
  that no live holder has, in the first segment no live lease overlaps: leases never
  overlap, a segment has one fetcher at most, and nobody goes upstream for a piece a peer
  has. It lasts ``lease_ttl`` from its grant, or from its holder's last announcement of
  new pieces in its range. Once its range is all held it is released (ask again); if it
  lapses first, the next asker takes over what is missing.
- Busy swarms. With more than ``sample_above`` askers (those that looked up within
  ``holder_ttl``) a lookup is answered with holders drawn at random — holders with a
  lease first (they have the newest pieces), then complete ones, then partial ones —
  instead of the rarest for the asker: a tenth of the cost to the coordinator
  (``benchmarks/bench_coordinator.py``), and askers that all lack nearly every piece
  gain little from answers of their own, while they learn their trading partners'
  new pieces from the partners themselves (``HAVE``). Simulated, nodes pulling 1 GB
  at once, coordinators free: p50 2.80 s at 1,000 nodes and 3.22 s at 10,000, against
  2.76 and 3.08 s with answers chosen for each asker and no ``HAVE`` (f8c19aa,
  09bf117), with 46 % fewer busy refusals at 10,000. Handing out a few shared answers
  instead (32, each rebuilt after 0.1 s) crowded askers onto the same holders: p50
  3.12 s at 3,000 nodes (2.97 s drawn at random), 3.93 s at 10,000.
- Piece hashes. The first hash for a piece from a node once granted a lease over it is
  authoritative and final. Until then the first from anyone stands in (after a change of
  coordinator no lease exists yet). Other disagreeing hashes are ignored and counted as
  conflicts: the whole-blob digest check decides who was right.

Time never goes backwards: a ``now`` earlier than one already seen counts as the latest.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from p2pd.core.bitfield import indices_of_mask
from p2pd.core.draws import sample, shuffle
from p2pd.core.pieces import PieceLayout
from p2pd.core.tuning import SAMPLE_ABOVE

HASH_SIZE = 32
_POOL_PER_SLOT = 4  # partial holders sampled per free slot of a lookup
_EVENTS = ("leases_granted", "takeovers", "conflicts", "rejected", "evicted")
_TIERS = 4  # rarity classes: pieces held by 1, 2-3, 4-7, 8+ holders


def bitfield(indices: Iterable[int]) -> int:
    """The bitfield (bit ``i`` set = piece ``i``) of a set of piece indices."""
    return sum(1 << index for index in set(indices))  # ValueError if an index is negative


def pieces_of(bits: int) -> frozenset[int]:
    """The piece indices set in ``bits``."""
    return frozenset(indices_of_mask(bits))


def _span(first: int, last: int) -> int:
    return (1 << last) - (1 << first)


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """A holder of a blob: its pieces (a bitfield) and the time of its last announcement."""

    node_id: str
    addr: str
    bits: int
    complete: bool
    last_seen: float


@dataclass(frozen=True, slots=True)
class Lease:
    """The right of ``node_id`` to fetch pieces ``first_piece..last_piece-1`` upstream."""

    node_id: str
    first_piece: int
    last_piece: int  # exclusive
    expires: float

    @property
    def mask(self) -> int:
        """The bitfield of the pieces the lease covers."""
        return _span(self.first_piece, self.last_piece)


@dataclass(frozen=True, slots=True)
class PeerList:
    """A lookup's answer: holders, piece hashes (``None`` if unknown), live leases;
    ``announced``: the pieces anyone ever announced (a bitfield); ``sampled``: holders
    drawn at random (see Busy swarms above)."""

    holders: tuple[HolderInfo, ...]
    hashes: tuple[bytes | None, ...]
    fetchers: tuple[Lease, ...]
    announced: int = 0
    sampled: bool = False


@dataclass(frozen=True, slots=True)
class CoordinatorStatistics:
    """Counts of the state (as left by the last operation) and of events so far."""

    swarms: int
    holders: int
    interested: int
    leases: int  # live now
    leases_granted: int
    takeovers: int  # leases granted over pieces whose previous lease lapsed
    conflicts: int  # piece hashes that disagreed with the table and were ignored
    rejected: int  # piece hashes out of range or not 32 bytes long
    evicted: int  # swarms dropped to stay within max_swarms


def _sample(rng: random.Random, ids: list[str], k: int, exclude: str) -> list[str]:
    """Up to ``k`` random ``ids`` other than ``exclude``, in O(k) for large lists."""
    return [n for n in sample(rng, ids, min(len(ids), k + 1)) if n != exclude][:k]


def _rarity_classes(availability: list[int]) -> list[int]:
    masks = [0] * _TIERS
    for index, held_by in enumerate(availability):
        if held_by:
            masks[min(held_by.bit_length(), _TIERS) - 1] |= 1 << index
    return masks


def _score(bits: int, uncovered: int, needed: int, tiers: tuple[int, ...], shift: int) -> int:
    """A candidate's worth, higher first: its new pieces of the rarest class, then of the
    next..., then all it has that the asker needs — each count ``shift`` bits wide (wider
    than any count), so comparing the sums compares the counts in that order."""
    new, score = bits & uncovered, 0
    for tier in tiers:
        score = score << shift | (new & tier).bit_count()
    return score << shift | (bits & needed).bit_count()


class BlobSwarm:
    """The soft state of one blob; driven by :class:`Coordinator`, which prunes it first."""

    def __init__(self, size: int, parts: int, counters: Counter[str],
                 layout: Callable[[int], PieceLayout] = PieceLayout.for_size) -> None:
        self.count = layout(size).count
        self.full = (1 << self.count) - 1
        self.parts = max(1, min(parts, self.count))
        self.holders: OrderedDict[str, HolderInfo] = OrderedDict()  # oldest last_seen first
        self.interested: OrderedDict[str, float] = OrderedDict()
        self.leases: dict[str, Lease] = {}
        self.hashes: dict[int, bytes] = {}
        self.held = 0  # bitfield of the pieces some live holder has
        self.announced = 0  # bitfield of the pieces anyone ever announced
        self._counters = counters
        self._availability = [0] * self.count
        # Whether each holder with pieces is complete, and the lists to sample holders
        # from (complete ones, partial ones), kept up to date in O(1) per change (a
        # removal moves the last entry into the gap): a swarm of 10,000 holders changes
        # all the time, and rebuilding the lists for the next lookup cost O(holders).
        self._complete: dict[str, bool] = {}
        self._lists: tuple[list[str], list[str]] = ([], [])
        self._at: dict[str, int] = {}  # a holder's position in its list
        self._tiers: tuple[int, ...] | None = None
        self._table: tuple[bytes | None, ...] | None = None
        self._authoritative = 0  # pieces whose hash came from their fetcher
        self._fetched: dict[str, int] = {}  # pieces each node was ever leased
        self._lapsed = 0  # missing pieces whose lease lapsed: granting them is a takeover

    def _set_holder(self, node_id: str, state: HolderInfo | None) -> None:
        old = self.holders.pop(node_id, None)
        old_bits, new_bits = (old.bits if old else 0), (state.bits if state else 0)
        if state is not None:
            self.holders[node_id] = state
        kind = state.complete if state is not None and (state.complete or new_bits) else None
        was = self._complete.pop(node_id, None)
        if was is not kind:
            if was is not None:
                self._unlist(node_id, was)
            if kind is not None:
                listed = self._lists[0 if kind else 1]
                self._at[node_id] = len(listed)
                listed.append(node_id)
        if kind is not None:
            self._complete[node_id] = kind
        if old_bits != new_bits:
            availability, emptied = self._availability, 0
            for index in indices_of_mask(new_bits & ~old_bits):
                availability[index] += 1
            for index in indices_of_mask(old_bits & ~new_bits):
                availability[index] -= 1
                emptied |= (not availability[index]) << index
            self.held = (self.held | new_bits) & ~emptied
            self.announced |= new_bits
            self._tiers = None

    def _unlist(self, node_id: str, complete: bool) -> None:
        listed, at = self._lists[0 if complete else 1], self._at.pop(node_id)
        last = listed.pop()
        if last != node_id:
            listed[at], self._at[last] = last, at

    def prune(self, now: float, holder_ttl: float) -> None:
        """Drop expired holders, interest and leases; release the leases that are done."""
        while self.holders and now - next(iter(self.holders.values())).last_seen >= holder_ttl:
            self._set_holder(next(iter(self.holders)), None)
        while self.interested and now - next(iter(self.interested.values())) >= holder_ttl:
            self.interested.popitem(last=False)
        for node_id, lease in list(self.leases.items()):
            if not lease.mask & ~self.held or now >= lease.expires:
                self._release(node_id)
        self._lapsed &= ~self.held

    def _release(self, node_id: str) -> None:
        lease = self.leases.pop(node_id, None)
        if lease is not None:
            self._lapsed |= lease.mask & ~self.held

    def forget(self, node_id: str) -> None:
        """Remove every trace of ``node_id`` but the hashes it taught; its lease lapses."""
        self._set_holder(node_id, None)
        self.interested.pop(node_id, None)
        self._release(node_id)

    def announce(
        self, state: HolderInfo, hashes: Mapping[int, bytes], lease_ttl: float
    ) -> Lease | None:
        """Replace the holder's snapshot; learn hashes; renew its lease on progress."""
        node_id, now = state.node_id, state.last_seen
        old = self.holders.get(node_id)
        gained = state.bits & ~(old.bits if old else 0)
        self._set_holder(node_id, state)
        self._learn(node_id, hashes)
        lease = self.leases.get(node_id)
        if lease is not None and gained & lease.mask:
            self.leases[node_id] = replace(lease, expires=now + lease_ttl)
        self.prune(now, float("inf"))  # releases the lease if its range is all held now
        return self.leases.get(node_id)

    def _learn(self, node_id: str, hashes: Mapping[int, bytes]) -> None:
        fetched = self._fetched.get(node_id, 0)
        for index, digest in hashes.items():
            if not 0 <= index < self.count or len(digest) != HASH_SIZE:
                self._counters["rejected"] += 1
                continue
            bit, digest, known = 1 << index, bytes(digest), self.hashes.get(index)
            if known is not None and known != digest:
                self._counters["conflicts"] += 1
            if known is None or (fetched & bit and not self._authoritative & bit):
                self.hashes[index], self._table = digest, None
            self._authoritative |= fetched & bit

    def lookup(self, node_id: str, now: float, max_peers: int, rng: random.Random,
               sample_above: int) -> PeerList:
        """Record interest; choose holders for ``node_id``: complete first, then those
        with the rarest pieces it lacks, or (more than ``sample_above`` askers) at random."""
        self.interested[node_id] = now
        self.interested.move_to_end(node_id)
        if len(self.interested) > sample_above:
            return self._sample(node_id, max_peers, rng)
        return self._answer(node_id, max_peers, rng)

    def _sample(self, node_id: str, max_peers: int, rng: random.Random) -> PeerList:
        """Holders with a lease (they have the newest pieces), then complete holders,
        then partial ones, at random."""
        chosen = [n for n in self.leases if n != node_id and n in self.holders][:max_peers]
        chosen += _sample(rng, self._lists[0], max_peers - len(chosen), node_id)
        if len(chosen) < max_peers:
            picked = set(chosen)
            more = _sample(rng, self._lists[1], max_peers - len(chosen) + len(picked), node_id)
            chosen += [n for n in more if n not in picked][:max_peers - len(chosen)]
        return self._peer_list(chosen, True)

    def _answer(self, node_id: str, max_peers: int, rng: random.Random) -> PeerList:
        chosen = _sample(rng, self._lists[0], max_peers, node_id)
        if len(chosen) < max_peers:
            chosen += self._rarest(node_id, max_peers - len(chosen), self._lists[1], rng)
        return self._peer_list(chosen, False)

    def _peer_list(self, chosen: list[str], sampled: bool) -> PeerList:
        if self._table is None:
            self._table = tuple(self.hashes.get(i) for i in range(self.count))
        return PeerList(tuple(self.holders[n] for n in chosen), self._table, self.fetchers(),
                        self.announced, sampled)

    def fetchers(self) -> tuple[Lease, ...]:
        """The live leases in piece order."""
        return tuple(sorted(self.leases.values(), key=lambda lease: lease.first_piece))

    def _rarest(self, asker: str, free: int, partial: list[str], rng: random.Random) -> list[str]:
        pool = _sample(rng, partial, _POOL_PER_SLOT * free, asker)
        extra = [n for n in self.leases if n != asker and self._complete.get(n) is False]
        extra = [n for n in extra if n not in pool]  # partial fetchers not sampled already
        if extra:
            pool += extra
            shuffle(rng, pool)  # a candidate's position breaks ties: at random
        if self._tiers is None:  # piece masks by rarity class, rarest first
            self._tiers = tuple(_rarity_classes(self._availability))
        mine = self.holders.get(asker)
        tiers, needed = self._tiers, self.full & ~(mine.bits if mine else 0)
        shift, places = self.count.bit_length() + 1, len(pool).bit_length()
        holders = [self.holders[node_id].bits for node_id in pool]
        # A heap entry is -score << places | position: the best score first, then the
        # earliest position (a tie-break at random, the pool being in random order).
        heap = [-_score(bits, needed, needed, tiers, shift) << places | position
                for position, bits in enumerate(holders) if bits & needed]
        heapq.heapify(heap)
        uncovered, picked, low = needed, list[str](), (1 << places) - 1
        # Lazy greedy: scores only fall as pieces get covered, so a re-scored candidate
        # that still beats every (stale, higher) score in the heap is the best one.
        while heap and len(picked) < free:
            position = heapq.heappop(heap) & low
            bits = holders[position]
            entry = -_score(bits, uncovered, needed, tiers, shift) << places | position
            if heap and entry > heap[0]:
                heapq.heappush(heap, entry)
                continue
            picked.append(pool[position])
            uncovered &= ~bits
        return picked

    def request_lease(self, node_id: str, now: float, lease_ttl: float) -> Lease | None:
        """The asker's live lease, or a new one over missing pieces, or ``None``."""
        self.interested[node_id] = now
        self.interested.move_to_end(node_id)
        if node_id in self.leases:
            return self.leases[node_id]
        missing, leased = self.full & ~self.held, 0
        for lease in self.leases.values():
            leased |= lease.mask
        for part in range(self.parts if missing else 0):
            segment = _span(part * self.count // self.parts, (part + 1) * self.count // self.parts)
            todo = missing & segment
            if not todo or leased & segment:
                continue
            first = (todo & -todo).bit_length() - 1
            run = todo >> first
            last = first + (~run & (run + 1)).bit_length() - 1  # the next piece not missing
            lease = self.leases[node_id] = Lease(node_id, first, last, now + lease_ttl)
            self._fetched[node_id] = self._fetched.get(node_id, 0) | lease.mask
            self._counters["leases_granted"] += 1
            self._counters["takeovers"] += bool(self._lapsed & lease.mask)
            self._lapsed &= ~lease.mask
            return lease
        return None


class Coordinator:
    """The soft state of a coordinator node, for every blob it coordinates.

    ``rng`` samples holders and breaks ties; ``holder_ttl`` drops holders (and askers)
    not heard from; ``lease_ttl`` bounds how long a silent fetcher holds others back; at
    most ``max_swarms`` blobs are kept, the least recently touched going first;
    ``sample_above`` askers make a swarm busy. ``layout`` is the piece size rule (the
    daemon's; the simulation may try others).
    """

    def __init__(
        self, *, rng: random.Random, holder_ttl: float, lease_ttl: float,
        max_peers: int = 16, max_fetchers: int = 1, split_threshold: int | None = None,
        max_swarms: int = 10_000, sample_above: int = SAMPLE_ABOVE,
        layout: Callable[[int], PieceLayout] = PieceLayout.for_size,
    ) -> None:
        if min(holder_ttl, lease_ttl) <= 0 or min(max_peers, max_fetchers, max_swarms) < 1:
            raise ValueError("the ttls must be positive, the maximums at least 1")
        self.rng, self.holder_ttl, self.lease_ttl = rng, holder_ttl, lease_ttl
        self.max_peers, self.max_fetchers, self.max_swarms = max_peers, max_fetchers, max_swarms
        self.split_threshold, self._layout = split_threshold, layout
        self.sample_above = sample_above
        self._swarms: OrderedDict[tuple[str, int], BlobSwarm] = OrderedDict()
        self._counters: Counter[str] = Counter()
        self._now = float("-inf")

    def _swarm(self, digest: str, size: int, now: float) -> BlobSwarm:
        key = (digest, size)
        swarm = self._swarms.get(key)
        if swarm is None:
            split = self.split_threshold is not None and size > self.split_threshold
            parts = self.max_fetchers if split else 1
            swarm = self._swarms[key] = BlobSwarm(size, parts, self._counters,
                                                               self._layout)
            while len(self._swarms) > self.max_swarms:
                self._swarms.popitem(last=False)
                self._counters["evicted"] += 1
        self._swarms.move_to_end(key)
        swarm.prune(now, self.holder_ttl)
        return swarm

    def announce(
        self, digest: str, size: int, node_id: str, addr: str, pieces: Iterable[int] | int,
        complete: bool, hashes: Mapping[int, bytes], now: float,
    ) -> Lease | None:
        """Record that ``node_id`` (at ``addr``) holds ``pieces`` (a full snapshot).

        ``pieces`` is a bitfield or piece indices (those past the end are ignored);
        ``hashes`` maps piece indices to sha256 digests. Returns the node's live lease,
        renewed if it added pieces of its range, or ``None``: none, lapsed, or done.
        """
        now = self._now = max(self._now, now)
        bits = pieces if isinstance(pieces, int) else bitfield(pieces)
        if bits < 0:
            raise ValueError("a bitfield cannot be negative")
        swarm = self._swarm(digest, size, now)
        complete = complete or bits & swarm.full == swarm.full
        bits = swarm.full if complete else bits & swarm.full
        state = HolderInfo(node_id, addr, bits, complete, now)
        return swarm.announce(state, hashes, self.lease_ttl)

    def lookup(self, digest: str, size: int, node_id: str, now: float) -> PeerList:
        """Up to ``max_peers`` live holders for ``node_id`` (never itself): complete ones
        first, then those with the rarest pieces it lacks. Records its interest.
        """
        now = self._now = max(self._now, now)
        return self._swarm(digest, size, now).lookup(node_id, now, self.max_peers, self.rng,
                                                     self.sample_above)

    def request_lease(self, digest: str, size: int, node_id: str, now: float) -> Lease | None:
        """``node_id``'s live lease, or a new one over the first run of pieces nobody holds
        in a segment no live lease overlaps, or ``None``: others fetch what is missing.
        """
        now = self._now = max(self._now, now)
        return self._swarm(digest, size, now).request_lease(node_id, now, self.lease_ttl)

    def leases(self, digest: str, size: int, now: float) -> tuple[Lease, ...]:
        """The live leases of a blob in piece order, without touching or creating its swarm."""
        now = self._now = max(self._now, now)
        swarm = self._swarms.get((digest, size))
        if swarm is not None:
            swarm.prune(now, self.holder_ttl)
        return swarm.fetchers() if swarm is not None else ()

    def forget(self, node_id: str) -> None:
        """Drop ``node_id`` everywhere (membership found it down); its leases lapse."""
        for swarm in self._swarms.values():
            swarm.forget(node_id)

    def forget_at(self, addrs: Collection[str]) -> None:
        """Drop every holder at one of ``addrs`` (membership found them down), with
        their leases: until then their pieces count as held, so nobody is granted a
        lease to fetch them again."""
        for swarm in self._swarms.values():
            for node_id in [n for n, h in swarm.holders.items() if h.addr in addrs]:
                swarm.forget(node_id)

    def expire(self, now: float) -> None:
        """Drop expired holders, interest and leases, then the swarms with nothing left."""
        now = self._now = max(self._now, now)
        for key, swarm in list(self._swarms.items()):
            swarm.prune(now, self.holder_ttl)
            if not (swarm.holders or swarm.interested or swarm.leases):
                del self._swarms[key]

    def statistics(self) -> CoordinatorStatistics:
        """Counts of swarms, holders, askers and leases, and of events so far."""
        swarms = self._swarms.values()
        return CoordinatorStatistics(
            swarms=len(swarms), holders=sum(len(s.holders) for s in swarms),
            interested=sum(len(s.interested) for s in swarms),
            leases=sum(len(s.leases) for s in swarms),
            **{event: self._counters[event] for event in _EVENTS},
        )
