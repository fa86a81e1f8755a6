"""Membership liveness and rendezvous hashing: every node picks the same coordinator."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.core.membership import (
    Liveness,
    Member,
    Membership,
    MembershipStatistics,
    coordinator_for,
    rendezvous_order,
    rendezvous_weight,
)

A, B, C = Member("a", "10.0.0.1:7070"), Member("b", "10.0.0.2:7070"), Member("c", "10.0.0.3:7070")


def cluster(self_id: str = "a", **kwargs: str) -> Membership:
    members = Membership(self_id, suspect_after=5, drop_after=20, **kwargs)
    members.update([C, A, B], now=0)
    return members


# -- membership ------------------------------------------------------------------------


def test_discovered_members_are_alive_and_sorted() -> None:
    members = cluster()
    assert members.alive() == [A, B, C]
    assert members.members() == [A, B, C]
    assert members.statistics() == MembershipStatistics(members=3, alive=3, suspect=0, down=0)


def test_update_replaces_the_set() -> None:
    members = cluster()
    members.update([A, C], now=1)
    assert members.alive() == [A, C]
    assert members.status("b") is None


def test_a_failure_streak_makes_a_member_suspect_then_down() -> None:
    members = cluster()
    members.failed("b", now=10)
    assert members.status("b", now=10) is Liveness.SUSPECT
    assert B in members.alive(now=29.9)  # suspects still count: one error moves nothing
    members.failed("b", now=25)  # a later failure does not restart the streak
    members.update([A, B, C], now=25)  # discovery refreshes c (silent since 0)
    assert members.status("b", now=30) is Liveness.DOWN
    assert members.alive(now=30) == [A, C]
    assert members.probe_candidates() == [B]
    assert members.statistics() == MembershipStatistics(members=3, alive=2, suspect=0, down=1)


def test_a_down_member_comes_back_when_heard_from() -> None:
    members = cluster()
    members.failed("b", now=1)
    assert B not in members.alive(now=30)
    members.heard_from("b", now=31)
    assert members.status("b") is Liveness.ALIVE
    assert members.probe_candidates() == []


def test_discovery_listing_does_not_clear_failures() -> None:
    # DNS keeps listing a crashed pod for a while; only a success ends the streak.
    members = cluster()
    members.failed("b", now=1)
    members.update([A, B, C], now=25)
    assert members.status("b") is Liveness.DOWN


def test_leaving_and_rejoining_discovery_starts_afresh() -> None:
    members = cluster()
    members.failed("b", now=1)
    members.update([A, C], now=25)
    members.update([A, B, C], now=26)
    assert members.status("b") is Liveness.ALIVE


def test_a_new_address_is_a_new_incarnation() -> None:
    members = cluster()
    members.failed("b", now=1)
    moved = Member("b", "10.0.0.9:7070")
    members.update([A, moved, C], now=25)
    assert members.alive() == [A, moved, C]


def test_silence_makes_suspect_then_down_unless_discovery_refreshes() -> None:
    members = cluster()
    assert members.status("c", now=4.9) is Liveness.ALIVE
    assert members.status("c", now=5) is Liveness.SUSPECT
    members.heard_from("b", now=19)
    assert members.alive(now=20) == [A, B]
    members.update([A, B, C], now=21)  # discovery still lists c: it is back
    assert members.alive() == [A, B, C]


def test_self_is_always_alive() -> None:
    members = cluster()
    members.failed("a", now=1)
    assert members.status("a", now=100) is Liveness.ALIVE
    assert members.alive() == [A]
    assert members.probe_candidates() == []


def test_self_addr_keeps_self_a_member_when_discovery_misses_it() -> None:
    members = Membership("z", suspect_after=5, drop_after=20, self_addr="10.0.0.26:7070")
    members.update([A], now=0)
    assert [m.node_id for m in members.alive()] == ["a", "z"]
    assert members.status("z") is Liveness.ALIVE
    assert members.statistics().members == 2
    members.update([A, Member("z", "10.1.1.1:7070")], now=1)  # discovery's address wins
    assert Member("z", "10.1.1.1:7070") in members.alive()


def test_unknown_nodes_are_ignored() -> None:
    members = cluster()
    members.heard_from("stranger", now=1)
    members.failed("stranger", now=1)
    assert members.status("stranger") is None
    assert members.alive() == [A, B, C]


def test_time_never_goes_backwards() -> None:
    members = cluster()
    members.failed("b", now=30)
    members.failed("c", now=10)  # an old timestamp counts as 30
    assert members.status("c", now=45) is Liveness.SUSPECT


def test_invalid_timeouts_are_refused() -> None:
    with pytest.raises(ValueError):
        Membership("a", suspect_after=10, drop_after=5)
    with pytest.raises(ValueError):
        Membership("a", suspect_after=0, drop_after=5)


events = st.lists(
    st.tuples(
        st.sampled_from(["update", "heard", "failed", "wait"]),
        st.sampled_from("abcde"),
        st.floats(0, 12),
        st.frozensets(st.sampled_from("abcde")),
    ),
    max_size=40,
)


@given(events)
def test_liveness_follows_the_evidence(
    script: list[tuple[str, str, float, frozenset[str]]],
) -> None:
    # A reference model of the rules in the module docstring.
    members = Membership("a", suspect_after=5, drop_after=20)
    listed: dict[str, float] = {}  # node -> last positive evidence
    failing: dict[str, float] = {}  # node -> start of failure streak
    now = 0.0
    for kind, node, step, subset in script:
        now += step
        if kind == "update":
            members.update([Member(n, f"{n}:1") for n in sorted(subset)], now)
            listed = {n: now for n in subset}
            failing = {n: t for n, t in failing.items() if n in subset}
        elif kind == "heard":
            members.heard_from(node, now)
            if node in listed:
                listed[node] = now
                failing.pop(node, None)
        elif kind == "failed":
            members.failed(node, now)
            if node in listed:
                failing.setdefault(node, now)
        expected = sorted(
            n for n in listed
            if n == "a" or (now - failing[n] < 20 if n in failing else now - listed[n] < 20)
        )
        assert [m.node_id for m in members.alive(now)] == expected
        assert {m.node_id for m in members.probe_candidates()} == set(failing) - {"a"}


# -- rendezvous hashing ----------------------------------------------------------------

ids = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
member_sets = st.lists(ids, min_size=1, max_size=20, unique=True).map(
    lambda names: [Member(n, f"{n}.svc:7070") for n in names]
)
digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


def test_weight_is_sha256_of_id_nul_digest() -> None:
    expected = int.from_bytes(hashlib.sha256(b"node-1\0sha256:ab").digest(), "big")
    assert rendezvous_weight("node-1", "sha256:ab") == expected


@given(member_sets, digests, st.randoms(use_true_random=False))
def test_order_is_by_weight_whatever_the_input_order(
    members: list[Member], digest: str, rnd: random.Random
) -> None:
    order = rendezvous_order(digest, members)
    weights = [rendezvous_weight(m.node_id, digest) for m in order]
    assert weights == sorted(weights, reverse=True)
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert rendezvous_order(digest, shuffled) == order
    assert coordinator_for(digest, shuffled) == order[0]


@given(member_sets.filter(lambda m: len(m) >= 2), digests, st.data())
def test_removing_a_member_keeps_the_order_of_the_rest(
    members: list[Member], digest: str, data: st.DataObject
) -> None:
    order = rendezvous_order(digest, members)
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    assert rendezvous_order(digest, rest) == [m for m in order if m != gone]
    if gone == order[0]:
        assert coordinator_for(digest, rest) == order[1]  # the successor takes over
    else:
        assert coordinator_for(digest, rest) == order[0]  # nothing moves


@settings(max_examples=20, deadline=None)
@given(st.lists(ids, min_size=10, max_size=10, unique=True), st.integers(0, 2**32))
def test_coordination_is_spread_evenly(names: list[str], seed: int) -> None:
    members = [Member(n, n) for n in names]
    rnd = random.Random(seed)
    load = Counter(
        coordinator_for(f"sha256:{rnd.getrandbits(256):064x}", members).node_id
        for _ in range(1000)
    )
    assert set(load) == set(names)
    assert all(50 <= count <= 150 for count in load.values()), load


def test_no_members_no_coordinator() -> None:
    with pytest.raises(ValueError):
        coordinator_for("sha256:00", [])
    assert rendezvous_order("sha256:00", []) == []
