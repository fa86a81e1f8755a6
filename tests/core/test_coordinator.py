"""The coordinator's soft state: holders, lookups, upstream leases and the piece table."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from p2pd.core.coordinator import (
    Coordinator,
    CoordinatorStatistics,
    Lease,
    bitfield,
    pieces_of,
)
from p2pd.core.pieces import MiB, PieceLayout

DIGEST = "sha256:" + "ab" * 32
SIZE = 10 * MiB  # ten pieces


def good(index: int) -> bytes:
    return hashlib.sha256(b"piece %d" % index).digest()


def bad(index: int) -> bytes:
    return hashlib.sha256(b"forged %d" % index).digest()


def make(**kwargs: object) -> Coordinator:
    options: dict[str, object] = {"holder_ttl": 30.0, "lease_ttl": 10.0} | kwargs
    return Coordinator(rng=random.Random(0), **options)  # type: ignore[arg-type]


def announce(
    coordinator: Coordinator, node: str, pieces: range | set[int], now: float,
    *, complete: bool = False, hashes: dict[int, bytes] | None = None, size: int = SIZE,
) -> Lease | None:
    table = {i: good(i) for i in pieces} if hashes is None else hashes
    return coordinator.announce(DIGEST, size, node, f"{node}:7071", pieces, complete, table, now)


# -- the cold start --------------------------------------------------------------------


def test_cold_start_of_ten_nodes_sends_one_fetcher_upstream() -> None:
    coordinator = make()
    nodes = [f"node-{i}" for i in range(10)]
    answers = [coordinator.request_lease(DIGEST, SIZE, node, now=0.0) for node in nodes]
    assert answers == [Lease("node-0", 0, 10, 10.0)] + [None] * 9
    for piece in range(10):  # the fetcher announces every piece as soon as it is verified
        now = 1.0 + piece
        lease = announce(coordinator, "node-0", range(piece + 1), now)
        assert lease == (Lease("node-0", 0, 10, now + 10) if piece < 9 else None)
        for node in nodes[1:]:
            peers = coordinator.lookup(DIGEST, SIZE, node, now)
            holders = {h.node_id: h for h in peers.holders}
            assert node not in holders
            assert holders["node-0"].bits == bitfield(range(piece + 1))
            assert holders["node-0"].complete == (piece == 9)
            assert peers.hashes == tuple(good(i) if i <= piece else None for i in range(10))
            assert coordinator.request_lease(DIGEST, SIZE, node, now) is None
        # Others copy what the fetcher has; they become holders for the next ones.
        announce(coordinator, nodes[1 + piece % 9], range(piece + 1), now)
    stats = coordinator.statistics()
    assert (stats.leases_granted, stats.leases, stats.takeovers, stats.conflicts) == (1, 0, 0, 0)


# -- lookups ---------------------------------------------------------------------------


def test_lookup_gives_complete_holders_first_then_the_rarest_pieces() -> None:
    coordinator = make(max_peers=3)
    announce(coordinator, "seed", range(10), 0.0, complete=True)
    for i in range(6):
        announce(coordinator, f"common-{i}", range(8), 0.0)
    announce(coordinator, "rare", {9}, 0.0)
    peers = coordinator.lookup(DIGEST, SIZE, "asker", 1.0)
    assert [h.node_id for h in peers.holders][:2] == ["seed", "rare"]
    assert peers.holders[2].node_id.startswith("common-")


def test_lookup_skips_holders_with_nothing_the_asker_lacks() -> None:
    coordinator = make()
    announce(coordinator, "asker", range(5), 0.0)
    announce(coordinator, "same", range(3), 0.0)
    announce(coordinator, "more", range(6), 0.0)
    peers = coordinator.lookup(DIGEST, SIZE, "asker", 1.0)
    assert [h.node_id for h in peers.holders] == ["more"]
    assert peers.holders[0].last_seen == 0.0


@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**32))
def test_lookup_is_bounded_and_never_returns_the_asker(
    holders: int, max_peers: int, seed: int
) -> None:
    coordinator = Coordinator(
        rng=random.Random(seed), holder_ttl=5.0, lease_ttl=2.0, max_peers=max_peers
    )
    rnd = random.Random(seed)
    for i in range(holders):
        pieces = {p for p in range(10) if rnd.random() < 0.5} | {rnd.randrange(10)}
        announce(coordinator, f"n{i}", pieces, now=float(i % 10))
    asker = f"n{rnd.randrange(holders)}"
    peers = coordinator.lookup(DIGEST, SIZE, asker, now=10.0)
    names = [h.node_id for h in peers.holders]
    assert asker not in names
    assert len(names) == len(set(names)) <= max_peers
    assert all(h.last_seen > 5.0 for h in peers.holders)  # silent for 5 s: expired


def test_holders_expire_after_holder_ttl() -> None:
    coordinator = make(holder_ttl=5.0)
    announce(coordinator, "a", range(3), 0.0)
    assert len(coordinator.lookup(DIGEST, SIZE, "b", 4.9).holders) == 1
    assert coordinator.lookup(DIGEST, SIZE, "b", 5.0).holders == ()


def test_a_big_swarm_still_answers_with_the_fetcher() -> None:
    coordinator = make()
    assert coordinator.request_lease(DIGEST, SIZE, "fetcher", 0.0) is not None
    announce(coordinator, "fetcher", range(6), 0.5)
    for i in range(3000):
        announce(coordinator, f"n{i}", range(i % 5 + 1), 1.0)
    peers = coordinator.lookup(DIGEST, SIZE, "asker", 1.0)
    assert len(peers.holders) == 16
    assert peers.holders[0].node_id == "fetcher"  # the only one with piece 5


def test_beyond_sample_above_askers_lookups_draw_holders_at_random() -> None:
    coordinator = make(sample_above=4)
    assert coordinator.request_lease(DIGEST, SIZE, "fetcher", 0.0) is not None
    announce(coordinator, "fetcher", range(2), 0.0)
    for i in range(100):  # a hundred holders of piece 9 (none has the fetcher's pieces)
        announce(coordinator, f"h{i}", {9}, 0.0)
    alone = [coordinator.lookup(DIGEST, SIZE, f"a{i}", 1.0) for i in range(3)]
    assert not any(answer.sampled for answer in alone)  # with the fetcher: 5 askers
    crowd = [coordinator.lookup(DIGEST, SIZE, f"a{i}", 1.0) for i in range(3, 203)]
    assert all(answer.sampled and len(answer.holders) == 16 for answer in crowd)
    assert all(answer.holders[0].node_id == "fetcher" for answer in crowd)  # newest first
    assert all(len({h.node_id for h in a.holders}) == 16 for a in crowd)
    others = Counter(h.node_id for a in crowd for h in a.holders[1:])
    assert len(others) == 100  # spread over every holder...
    assert max(others.values()) < 3 * 200 * 15 / 100  # ...none crowded (mean 30)


# -- leases ----------------------------------------------------------------------------


def test_holders_found_down_are_forgotten_and_their_pieces_leased_again() -> None:
    coordinator = make(max_fetchers=2, split_threshold=0)  # segments 0-4 and 5-9
    announce(coordinator, "dead", range(5), 0.0)  # at dead:7071
    announce(coordinator, "live", range(3), 0.0)
    assert coordinator.request_lease(DIGEST, SIZE, "asker", 1.0) == Lease("asker", 5, 10, 11.0)
    coordinator.forget_at({"dead:7071"})
    assert [h.node_id for h in coordinator.lookup(DIGEST, SIZE, "x", 1.0).holders] == ["live"]
    assert coordinator.request_lease(DIGEST, SIZE, "other", 1.0) == Lease("other", 3, 5, 11.0)



def test_a_lease_is_renewed_only_by_progress_in_its_range() -> None:
    coordinator = make()
    assert coordinator.request_lease(DIGEST, SIZE, "f", 0.0) == Lease("f", 0, 10, 10.0)
    assert announce(coordinator, "f", set(), 5.0) == Lease("f", 0, 10, 10.0)
    assert announce(coordinator, "f", {0}, 6.0) == Lease("f", 0, 10, 16.0)
    assert announce(coordinator, "f", {0}, 7.0) == Lease("f", 0, 10, 16.0)
    assert coordinator.request_lease(DIGEST, SIZE, "f", 8.0) == Lease("f", 0, 10, 16.0)
    assert coordinator.leases(DIGEST, SIZE, 16.0) == ()


def test_a_dead_fetchers_lease_lapses_and_the_next_asker_takes_over_the_rest() -> None:
    coordinator = make()
    assert coordinator.request_lease(DIGEST, SIZE, "dead", 0.0) is not None
    for piece in range(4):
        announce(coordinator, "dead", range(piece + 1), 1.0 + piece)  # last progress at 4.0
    announce(coordinator, "copier", range(2), 5.0)
    assert coordinator.request_lease(DIGEST, SIZE, "copier", 13.9) is None
    assert coordinator.request_lease(DIGEST, SIZE, "copier", 14.0) == Lease("copier", 4, 10, 24.0)
    assert coordinator.statistics().takeovers == 1


def test_a_lease_covers_only_the_first_run_of_missing_pieces() -> None:
    coordinator = make()
    announce(coordinator, "peer", {0, 1, 5}, 0.0)
    assert coordinator.request_lease(DIGEST, SIZE, "f", 1.0) == Lease("f", 2, 5, 11.0)
    assert coordinator.request_lease(DIGEST, SIZE, "g", 1.0) is None
    assert announce(coordinator, "f", {2, 3, 4}, 2.0) is None  # done: released
    assert coordinator.request_lease(DIGEST, SIZE, "g", 2.0) == Lease("g", 6, 10, 12.0)


def test_forgetting_a_fetcher_frees_its_lease() -> None:
    coordinator = make()
    assert coordinator.request_lease(DIGEST, SIZE, "f", 0.0) is not None
    announce(coordinator, "f", range(3), 1.0)
    coordinator.forget("f")
    assert coordinator.lookup(DIGEST, SIZE, "g", 2.0).holders == ()
    assert coordinator.request_lease(DIGEST, SIZE, "g", 2.0) == Lease("g", 0, 10, 12.0)
    assert coordinator.statistics().takeovers == 1


def test_large_blobs_are_split_between_fetchers() -> None:
    coordinator = make(max_fetchers=4, split_threshold=64 * MiB)
    big = 100 * MiB  # 100 pieces
    grants = [coordinator.announce(DIGEST, big, "x", "x:1", (), False, {}, 0.0)] + [
        coordinator.request_lease(DIGEST, big, f"n{i}", 0.0) for i in range(6)
    ]
    assert grants == [
        None, Lease("n0", 0, 25, 10.0), Lease("n1", 25, 50, 10.0), Lease("n2", 50, 75, 10.0),
        Lease("n3", 75, 100, 10.0), None, None,
    ]
    assert coordinator.request_lease(DIGEST, SIZE, "n0", 0.0) == Lease("n0", 0, 10, 10.0)
    assert coordinator.request_lease(DIGEST, SIZE, "n1", 0.0) is None  # small: one fetcher


@given(st.integers(1, 30), st.integers(0, 300 * MiB))
def test_simultaneous_askers_get_exactly_one_lease(askers: int, size: int) -> None:
    coordinator = make(split_threshold=0)
    grants = [coordinator.request_lease(DIGEST, size, f"n{i}", 5.0) for i in range(askers)]
    granted = [g for g in grants if g is not None]
    count = PieceLayout.for_size(size).count
    assert granted == ([Lease("n0", 0, count, 15.0)] if count else [])


@given(st.integers(1, 12), st.integers(1, 8), st.integers(1, 600 * MiB))
def test_split_leases_are_disjoint_and_cover_the_blob(
    askers: int, max_fetchers: int, size: int
) -> None:
    coordinator = make(max_fetchers=max_fetchers, split_threshold=0)
    grants = [coordinator.request_lease(DIGEST, size, f"n{i}", 0.0) for i in range(askers)]
    granted = [g for g in grants if g is not None]
    count = PieceLayout.for_size(size).count
    assert len(granted) == min(askers, max_fetchers, count)
    covered = [i for g in granted for i in range(g.first_piece, g.last_piece)]
    assert len(covered) == len(set(covered))
    if askers >= max_fetchers:
        assert sorted(covered) == list(range(count))
    assert coordinator.leases(DIGEST, size, 0.0) == tuple(granted)


def test_nothing_to_fetch_for_an_empty_blob() -> None:
    coordinator = make()
    assert coordinator.request_lease(DIGEST, 0, "a", 0.0) is None
    assert coordinator.lookup(DIGEST, 0, "a", 0.0).hashes == ()


# -- the piece table -------------------------------------------------------------------


def test_the_fetchers_hash_is_authoritative() -> None:
    coordinator = make()
    announce(coordinator, "early", {0}, 0.0, hashes={0: bad(0)})  # nobody fetches yet
    assert coordinator.lookup(DIGEST, SIZE, "x", 0.0).hashes[0] == bad(0)
    assert coordinator.request_lease(DIGEST, SIZE, "f", 1.0) == Lease("f", 1, 10, 11.0)
    announce(coordinator, "f", {1}, 2.0, hashes={0: good(0), 1: good(1)})
    table = coordinator.lookup(DIGEST, SIZE, "x", 2.0).hashes
    assert table[:2] == (bad(0), good(1))  # piece 0 was not in f's lease: f's word is hearsay
    announce(coordinator, "liar", {1}, 3.0, hashes={1: bad(1)})
    assert coordinator.lookup(DIGEST, SIZE, "x", 3.0).hashes[1] == good(1)
    assert coordinator.statistics().conflicts == 2


def test_an_authoritative_hash_replaces_a_stand_in() -> None:
    coordinator = make()
    assert coordinator.request_lease(DIGEST, SIZE, "f", 0.0) is not None
    announce(coordinator, "early", {0}, 0.0, hashes={0: bad(0)})
    announce(coordinator, "f", {0}, 1.0, hashes={0: good(0)})
    announce(coordinator, "early", {0}, 2.0, hashes={0: bad(0)})
    assert coordinator.lookup(DIGEST, SIZE, "x", 2.0).hashes[0] == good(0)
    assert coordinator.statistics().conflicts == 2


def test_malformed_hashes_are_rejected() -> None:
    coordinator = make()
    announce(coordinator, "a", {0}, 0.0, hashes={0: b"short", 10: good(10), -1: good(0)})
    assert coordinator.lookup(DIGEST, SIZE, "x", 0.0).hashes == (None,) * 10
    assert coordinator.statistics().rejected == 3


def test_a_new_coordinator_rebuilds_the_state_from_repeated_announcements() -> None:
    old = make()
    assert old.request_lease(DIGEST, SIZE, "f", 0.0) is not None
    announce(old, "f", range(4), 1.0)
    announce(old, "g", range(2), 1.0)
    new = make()  # the old coordinator died; the next in rendezvous order takes over
    announce(new, "f", range(4), 2.0)
    announce(new, "g", range(2), 2.0)
    peers = new.lookup(DIGEST, SIZE, "h", 2.0)
    assert {h.node_id for h in peers.holders} == {"f", "g"}
    assert peers.hashes == old.lookup(DIGEST, SIZE, "h", 2.0).hashes
    assert new.request_lease(DIGEST, SIZE, "f", 2.0) == Lease("f", 4, 10, 12.0)


# -- bookkeeping -----------------------------------------------------------------------


def test_swarms_are_keyed_by_digest_and_size() -> None:
    coordinator = make()
    announce(coordinator, "a", {0}, 0.0)
    assert coordinator.lookup(DIGEST, SIZE + 1, "b", 0.0).holders == ()
    assert coordinator.statistics().swarms == 2


def test_pieces_as_bitfield_or_indices_and_completeness() -> None:
    coordinator = make()
    coordinator.announce(DIGEST, SIZE, "a", "a:1", 0b101 | 1 << 40, False, {}, 0.0)
    announce(coordinator, "b", {0, 2}, 0.0)
    announce(coordinator, "c", range(10), 0.0)
    announce(coordinator, "d", set(), 0.0, complete=True)
    holders = {h.node_id: h for h in coordinator.lookup(DIGEST, SIZE, "x", 0.0).holders}
    assert holders["a"].bits == holders["b"].bits == 0b101
    assert pieces_of(holders["a"].bits) == {0, 2}
    assert holders["c"].complete and holders["d"].bits == bitfield(range(10))
    with pytest.raises(ValueError):
        coordinator.announce(DIGEST, SIZE, "a", "a:1", -1, False, {}, 0.0)
    with pytest.raises(ValueError):
        announce(coordinator, "a", {-1}, 0.0)


def test_expire_drops_stale_state_and_idle_swarms() -> None:
    coordinator = make(holder_ttl=5.0, lease_ttl=3.0)
    assert coordinator.request_lease(DIGEST, SIZE, "f", 0.0) is not None
    announce(coordinator, "a", {0}, 1.0)
    coordinator.lookup("sha256:" + "cd" * 32, SIZE, "b", 2.0)
    coordinator.expire(4.0)
    assert coordinator.statistics() == CoordinatorStatistics(
        swarms=2, holders=1, interested=2, leases=0, leases_granted=1, takeovers=0,
        conflicts=0, rejected=0, evicted=0,
    )
    coordinator.expire(7.0)
    assert coordinator.statistics().swarms == 0


def test_the_least_recently_touched_swarm_is_evicted() -> None:
    coordinator = make(max_swarms=2)
    digests = ["sha256:" + c * 64 for c in "123"]
    coordinator.announce(digests[0], SIZE, "a", "a:1", {0}, False, {}, 0.0)
    coordinator.announce(digests[1], SIZE, "a", "a:1", {0}, False, {}, 0.0)
    coordinator.lookup(digests[0], SIZE, "b", 1.0)
    coordinator.lookup(digests[2], SIZE, "b", 2.0)  # evicts digests[1]
    assert coordinator.statistics().evicted == 1
    assert [h.node_id for h in coordinator.lookup(digests[0], SIZE, "b", 3.0).holders] == ["a"]
    assert coordinator.lookup(digests[1], SIZE, "b", 3.0).holders == ()  # forgotten
    assert (coordinator.statistics().swarms, coordinator.statistics().evicted) == (2, 2)


def test_time_never_goes_backwards() -> None:
    coordinator = make(holder_ttl=5.0)
    announce(coordinator, "a", {0}, 0.0)
    coordinator.expire(10.0)
    assert coordinator.lookup(DIGEST, SIZE, "b", 1.0).holders == ()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        make(holder_ttl=0.0)
    with pytest.raises(ValueError):
        make(max_fetchers=0)


@given(st.frozensets(st.integers(0, 700)))
def test_bitfield_round_trip(indices: frozenset[int]) -> None:
    assert pieces_of(bitfield(indices)) == indices


# -- the state machine -----------------------------------------------------------------

NODES = [f"n{i}" for i in range(6)]
BLOBS = [("sha256:" + "1" * 64, 6 * MiB), ("sha256:" + "2" * 64, 40 * MiB)]
HOLDER_TTL, LEASE_TTL, MAX_PEERS, SPLIT = 10.0, 4.0, 3, 8 * MiB


def _span_bits(first: int, last: int) -> int:
    return (1 << last) - (1 << first)


@dataclass
class Model:
    """What the coordinator should know of one blob, per the rules in its docstring."""

    count: int
    parts: int
    holders: dict[str, tuple[int, bool, float]] = field(default_factory=dict)
    interest: dict[str, float] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    grants: dict[str, int] = field(default_factory=dict)  # node -> pieces ever leased
    table: dict[int, bytes] = field(default_factory=dict)
    authoritative: dict[int, bytes] = field(default_factory=dict)
    lapsed: int = 0

    @property
    def full(self) -> int:
        return (1 << self.count) - 1

    @property
    def held(self) -> int:
        held = 0
        for bits, _, _ in self.holders.values():
            held |= bits
        return held

    def settle(self, now: float) -> None:
        for node, lease in list(self.leases.items()):
            if not lease.mask & ~self.held or now >= lease.expires:
                self.release(node)
        self.lapsed &= ~self.held

    def prune(self, now: float) -> None:
        self.holders = {n: h for n, h in self.holders.items() if now - h[2] < HOLDER_TTL}
        self.interest = {n: t for n, t in self.interest.items() if now - t < HOLDER_TTL}
        self.settle(now)

    def release(self, node: str) -> None:
        lease = self.leases.pop(node, None)
        if lease is not None:
            self.lapsed |= lease.mask & ~self.held

    def idle(self) -> bool:
        return not (self.holders or self.interest or self.leases)


class CoordinatorMachine(RuleBasedStateMachine):
    """Random announces, lookups, lease requests, failures and time against a model."""

    max_fetchers = 1

    def __init__(self) -> None:
        super().__init__()
        self.coordinator = Coordinator(
            rng=random.Random(1), holder_ttl=HOLDER_TTL, lease_ttl=LEASE_TTL,
            max_peers=MAX_PEERS, max_fetchers=self.max_fetchers, split_threshold=SPLIT,
        )
        self.now = 0.0
        self.models = {blob: self._fresh(blob) for blob in BLOBS}
        self.conflicts = self.takeovers = self.granted = 0

    def _fresh(self, blob: tuple[str, int]) -> Model:
        count = PieceLayout.for_size(blob[1]).count
        return Model(count, min(count, self.max_fetchers if blob[1] > SPLIT else 1))

    def _model(self, blob: tuple[str, int]) -> Model:
        model = self.models[blob]
        model.prune(self.now)
        return model

    @rule(
        node=st.sampled_from(NODES), blob=st.sampled_from(BLOBS), seed=st.integers(0, 2**40),
        grow=st.booleans(), complete=st.booleans(), liar=st.booleans(),
    )
    def announce(
        self, node: str, blob: tuple[str, int], seed: int, grow: bool, complete: bool, liar: bool
    ) -> None:
        model = self._model(blob)
        old = model.holders.get(node, (0, False, 0.0))[0]
        bits = (seed & model.full) | (old if grow else 0)
        complete = (complete and seed % 7 == 0) or bits == model.full
        bits = model.full if complete else bits
        hashes = {i: (bad if liar else good)(i) for i in pieces_of(bits)}
        lease = self.coordinator.announce(
            blob[0], blob[1], node, f"{node}:1", bits, complete, hashes, self.now
        )
        model.holders[node] = (bits, complete, self.now)
        fetched = model.grants.get(node, 0)
        for index, digest in hashes.items():
            known = model.table.get(index)
            self.conflicts += known is not None and known != digest
            if fetched >> index & 1 and index not in model.authoritative:
                model.table[index] = model.authoritative[index] = digest
            model.table.setdefault(index, digest)
        mine = model.leases.get(node)
        if mine is not None and bits & ~old & mine.mask:
            model.leases[node] = Lease(node, mine.first_piece, mine.last_piece,
                                       self.now + LEASE_TTL)
        model.settle(self.now)
        assert lease == model.leases.get(node)

    @rule(blob=st.sampled_from(BLOBS), data=st.data())
    def fetcher_progresses(self, blob: tuple[str, int], data: st.DataObject) -> None:
        """A fetcher announces some more pieces of its range (maybe all of them)."""
        model = self._model(blob)
        if model.leases:
            node = data.draw(st.sampled_from(sorted(model.leases)))
            lease = model.leases[node]
            fetched = data.draw(st.integers(lease.first_piece + 1, lease.last_piece))
            self.announce(node, blob, _span_bits(lease.first_piece, fetched), True, False, False)

    @rule(node=st.sampled_from(NODES), blob=st.sampled_from(BLOBS))
    def lookup(self, node: str, blob: tuple[str, int]) -> None:
        model = self._model(blob)
        peers = self.coordinator.lookup(blob[0], blob[1], node, self.now)
        model.interest[node] = self.now
        names = [h.node_id for h in peers.holders]
        assert node not in names and len(names) == len(set(names)) <= MAX_PEERS
        for holder in peers.holders:  # live, and as last announced
            assert model.holders[holder.node_id] == (holder.bits, holder.complete, holder.last_seen)
        kinds = [h.complete for h in peers.holders]
        assert kinds == sorted(kinds, reverse=True)  # complete holders first
        lacks = model.full & ~model.holders.get(node, (0, False, 0.0))[0]
        useful = [n for n, (bits, _, _) in model.holders.items() if n != node and bits & lacks]
        complete = [n for n, (_, done, _) in model.holders.items() if n != node and done]
        assert len(names) == min(MAX_PEERS, len(set(useful) | set(complete)))
        assert peers.hashes == tuple(model.table.get(i) for i in range(model.count))
        assert all(peers.hashes[i] == h for i, h in model.authoritative.items())
        assert peers.fetchers == tuple(sorted(model.leases.values(), key=lambda x: x.first_piece))

    @rule(node=st.sampled_from(NODES), blob=st.sampled_from(BLOBS))
    def request_lease(self, node: str, blob: tuple[str, int]) -> None:
        model = self._model(blob)
        lease = self.coordinator.request_lease(blob[0], blob[1], node, self.now)
        model.interest[node] = self.now
        if node in model.leases:
            assert lease == model.leases[node]
            return
        missing, others = model.full & ~model.held, 0
        for other in model.leases.values():
            others |= other.mask
        bounds = [p * model.count // model.parts for p in range(model.parts + 1)]
        free = [  # segments with missing pieces and no lease
            (lo, hi) for lo, hi in itertools.pairwise(bounds)
            if missing & _span_bits(lo, hi) and not others & _span_bits(lo, hi)
        ]
        if lease is None:
            assert not free  # every missing piece is someone's to fetch already
            return
        assert (lease.node_id, lease.expires) == (node, self.now + LEASE_TTL)
        assert lease.mask & missing == lease.mask  # only pieces nobody holds
        assert not lease.mask & others  # leases never overlap
        assert lease.first_piece >= free[0][0] and lease.last_piece <= free[0][1]
        model.leases[node] = lease
        model.grants[node] = model.grants.get(node, 0) | lease.mask
        self.granted += 1
        self.takeovers += bool(model.lapsed & lease.mask)
        model.lapsed &= ~lease.mask

    @rule(node=st.sampled_from(NODES))
    def forget(self, node: str) -> None:
        self.coordinator.forget(node)
        for model in self.models.values():
            model.holders.pop(node, None)
            model.interest.pop(node, None)
            model.release(node)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, LEASE_TTL, 6.0, HOLDER_TTL]))
    def advance_time(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def expire(self) -> None:
        self.coordinator.expire(self.now)
        for blob in BLOBS:
            if self._model(blob).idle():
                self.models[blob] = self._fresh(blob)  # the swarm, and what it knew, is gone

    @invariant()
    def leases_match_and_never_overlap(self) -> None:
        for blob in BLOBS:
            model = self._model(blob)
            leases = self.coordinator.leases(blob[0], blob[1], self.now)
            assert set(leases) == set(model.leases.values())
            assert len(leases) <= model.parts
            covered = [i for lease in leases for i in range(lease.first_piece, lease.last_piece)]
            assert len(covered) == len(set(covered))
            assert all(self.now < lease.expires <= self.now + LEASE_TTL for lease in leases)

    @invariant()
    def counters_match(self) -> None:
        stats = self.coordinator.statistics()
        assert (stats.leases_granted, stats.takeovers, stats.conflicts) == (
            self.granted, self.takeovers, self.conflicts,
        )


class SplitCoordinatorMachine(CoordinatorMachine):
    """The same with three fetchers allowed on the large blob."""

    max_fetchers = 3


_machine_settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
TestCoordinatorMachine = CoordinatorMachine.TestCase
TestCoordinatorMachine.settings = _machine_settings
TestSplitCoordinatorMachine = SplitCoordinatorMachine.TestCase
TestSplitCoordinatorMachine.settings = _machine_settings


# -- lookups at scale: the same choice, cheaper ------------------------------------------


def _greedy(pool: list[str], bits: dict[str, int], needed: int, tiers: tuple[int, ...],
            free: int) -> list[str]:
    """The specification of the partial holders a lookup picks: again and again, the one
    with the most new pieces of the rarest class, then the next class..., then the most
    pieces the asker needs; ties to the earliest in the pool."""
    uncovered, picked = needed, []
    candidates = [n for n in pool if bits[n] & needed]
    def key(n: str, uncovered: int) -> tuple[int, ...]:
        new = bits[n] & uncovered
        counts = [(new & tier).bit_count() for tier in tiers]
        return (*counts, (bits[n] & needed).bit_count(), -pool.index(n))

    while candidates and len(picked) < free:
        best = max(candidates, key=lambda n: key(n, uncovered))
        picked.append(best)
        candidates.remove(best)
        uncovered &= ~bits[best]
    return picked


@settings(max_examples=200)
@given(st.lists(st.integers(0, 2**40 - 1), min_size=1, max_size=40), st.integers(1, 16),
       st.integers(0, 2**40 - 1), st.integers(0, 2**32))
def test_lookup_picks_partial_holders_greedily_by_rarity(
    holdings: list[int], free: int, mine: int, seed: int,
) -> None:
    coordinator = make()
    size = 40 * MiB
    for i, held in enumerate(holdings):
        coordinator.announce(DIGEST, size, f"n{i}", "", held, False, {}, 0.0)
    coordinator.announce(DIGEST, size, "asker", "", mine, False, {}, 0.0)
    swarm = coordinator._swarms[(DIGEST, size)]
    partial, rng = swarm._lists[1], random.Random(seed)
    twin = random.Random()
    twin.setstate(rng.getstate())
    pool = [n for n in twin.sample(partial, min(len(partial), 4 * free + 1))
            if n != "asker"][:4 * free]
    swarm._tiers = None
    chosen = swarm._rarest("asker", free, partial, rng)
    assert swarm._tiers is not None
    bits = {n: h.bits for n, h in swarm.holders.items()}
    assert chosen == _greedy(pool, bits, swarm.full & ~bits["asker"], swarm._tiers, free)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(["none", "some", "all", "gone"])),
                max_size=60))
def test_the_lists_lookups_sample_from_follow_every_change(
    changes: list[tuple[int, str]],
) -> None:
    coordinator = make()
    for node, change in changes:
        if change == "gone":
            coordinator.forget(f"n{node}")
            continue
        pieces = {"none": set(), "some": {node % 10}, "all": set(range(10))}[change]
        announce(coordinator, f"n{node}", pieces, 0.0, complete=change == "all")
    swarm = coordinator._swarms.get((DIGEST, SIZE))
    if swarm is None:
        return
    complete = sorted(n for n, h in swarm.holders.items() if h.complete)
    partial = sorted(n for n, h in swarm.holders.items() if not h.complete and h.bits)
    assert sorted(swarm._lists[0]) == complete and sorted(swarm._lists[1]) == partial
    for listed in swarm._lists:
        assert all(swarm._at[n] == i for i, n in enumerate(listed))

