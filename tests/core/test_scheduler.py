"""The piece scheduler: rarest first, limits, timeouts, blame, endgame, upstream policy."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from p2pd.core.peerscore import InFlight, PeerScores
from p2pd.core.pieces import PieceLayout
from p2pd.core.scheduler import (
    Action,
    CancelRequest,
    FetchUpstream,
    RequestPiece,
    Scheduler,
    endgame_size,
)


def make(count: int, seed: int = 0, **options: object) -> Scheduler:
    """A scheduler for a blob of ``count`` one-byte pieces."""
    return Scheduler(PieceLayout(count, 1), rng=random.Random(seed), **options)  # type: ignore[arg-type]


def mask(pieces: Iterable[int]) -> int:
    """Pieces as a mask (bit ``i``: piece ``i``)."""
    return sum(1 << i for i in set(pieces))


def requested(actions: list[Action], peer: str | None = None) -> list[int]:
    return [a.index for a in actions if isinstance(a, RequestPiece) and peer in (None, a.peer_id)]


def upstream(actions: list[Action]) -> list[int]:
    return [i for a in actions if isinstance(a, FetchUpstream) for i in a.indices]


# -- piece choice ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), events=st.lists(
    st.tuples(st.sampled_from("abcd"), st.sets(st.integers(0, 11), max_size=8),
              st.sampled_from(["update", "has", "full"])), max_size=30))
def test_masks_feed_the_scheduler_as_piece_lists_do(
        seed: int, events: list[tuple[str, set[int], str]]) -> None:
    listed, masked = make(12, seed, max_in_flight=5), make(12, seed, max_in_flight=5)
    for step, (peer, pieces, kind) in enumerate(events):
        if kind == "has":
            listed.peer_has(peer, pieces, 0.0)
            masked.peer_has_bits(peer, mask(pieces), 0.0)
        else:
            listed.peer_update(peer, pieces, kind == "full", 0.0)
            masked.peer_update_bits(peer, mask(range(12) if kind == "full" else pieces), 0.0)
        if step % 3 == 2:
            actions = listed.next_actions(0.0)
            assert masked.next_actions(0.0) == actions
            for action in actions:
                if isinstance(action, RequestPiece):
                    listed.piece_received(action.peer_id, action.index, True, 0.0)
                    masked.piece_received(action.peer_id, action.index, True, 0.0)
        assert masked.statistics() == listed.statistics()
    with pytest.raises(ValueError):
        masked.peer_update_bits("a", 1 << 12, 0.0)


@pytest.mark.parametrize("first", ["a", "b"])
def test_rarest_pieces_are_requested_first(first: str) -> None:
    sched = make(10, max_in_flight_per_peer=5)
    holdings = {"a": range(10), "b": range(5)}
    for peer in (first, "b" if first == "a" else "a"):
        sched.peer_update(peer, holdings[peer], False, 0.0)
    actions = sched.next_actions(0.0)
    assert sorted(requested(actions, "a")) == [5, 6, 7, 8, 9]  # only a has them
    assert sorted(requested(actions, "b")) == [0, 1, 2, 3, 4]


def test_rarity_beats_the_streaming_window() -> None:
    sched = make(20, max_in_flight_per_peer=1)
    sched.peer_update("a", range(20), True, 0.0)
    sched.peer_update("b", range(20), True, 0.0)
    sched.peer_update("c", range(10), False, 0.0)  # the front is the common part
    sched.peer_update("d", range(10), False, 0.0)
    actions = sched.next_actions(0.0)
    assert all(index >= 10 for index in requested(actions, "a") + requested(actions, "b"))
    assert requested(actions, "c") + requested(actions, "d") == [0, 1]  # window among equals


def test_equally_rare_pieces_go_front_first_when_two_peers_hold_them() -> None:
    sched = make(40, seed=7)
    sched.peer_update("a", range(40), True, 0.0)
    sched.peer_update("b", range(40), True, 0.0)
    assert requested(sched.next_actions(0.0)) == list(range(8))


def test_a_single_source_is_asked_in_each_nodes_own_random_order() -> None:
    firsts = set()
    for seed in range(20):
        sched = make(100, seed=seed)
        sched.peer_update("seed", range(100), True, 0.0)
        firsts.add(tuple(requested(sched.next_actions(0.0))))
    assert len(firsts) == 20  # no herding on the front pieces
    assert (0, 1, 2, 3) not in firsts


def test_without_a_window_ties_follow_the_random_order() -> None:
    orders = set()
    for seed in range(10):
        sched = make(50, seed=seed, sequential_window=0)
        sched.peer_update("a", range(50), True, 0.0)
        sched.peer_update("b", range(50), True, 0.0)
        orders.add(tuple(requested(sched.next_actions(0.0))))
    assert len(orders) == 10


def test_never_more_than_the_allowance_per_peer_and_never_a_piece_twice() -> None:
    sched = make(30, max_in_flight_per_peer=3)
    sched.peer_update("a", range(30), True, 0.0)
    sched.peer_update("b", range(0, 30, 2), False, 0.0)
    actions = sched.next_actions(0.0)
    assert len(requested(actions, "a")) == len(requested(actions, "b")) == 3
    assert len(set(requested(actions))) == 6
    assert sched.next_actions(0.0) == []


# -- timeouts, refusals, blame ---------------------------------------------------------


def test_a_stalled_request_is_reissued_to_another_peer_after_the_timeout() -> None:
    sched = make(1, request_timeout=10.0, endgame_threshold=0)
    sched.peer_update("a", [0], False, 0.0)
    sched.peer_update("b", [0], False, 0.0)
    [first] = sched.next_actions(0.0)
    assert isinstance(first, RequestPiece)
    other = "b" if first.peer_id == "a" else "a"
    assert sched.next_deadline() == 10.0
    sched.tick(9.99)
    assert sched.next_actions(9.99) == []
    sched.tick(10.0)
    assert sched.next_actions(10.0) == [RequestPiece(other, 0)]
    assert sched.known(first.peer_id) == frozenset()  # treated as not holding it any more
    assert sched.statistics().timeouts == 1


def test_progress_postpones_the_timeout() -> None:
    sched = make(1, request_timeout=10.0, endgame_threshold=0)
    sched.peer_update("a", [0], False, 0.0)
    sched.peer_update("b", [0], False, 0.0)
    [first] = sched.next_actions(0.0)
    assert isinstance(first, RequestPiece)
    sched.progress(first.peer_id, 0, 8.0)
    sched.tick(10.0)
    assert sched.next_actions(10.0) == []
    sched.tick(17.5)
    assert sched.next_actions(17.5) == []
    sched.tick(18.0)
    assert requested(sched.next_actions(18.0)) == [0]


def test_timeouts_halve_a_peers_allowance_and_deliveries_restore_it() -> None:
    sched = make(40, max_in_flight_per_peer=4, endgame_threshold=0)
    sched.peer_update("a", range(40), True, 0.0)
    assert len(requested(sched.next_actions(0.0))) == 4
    sched.tick(10.0)  # all four expire: 4 -> 2 -> 1 -> 1 -> 1
    sched.peer_update("a", range(40), True, 10.0)
    [again] = requested(sched.next_actions(10.0))
    sched.piece_received("a", again, True, 11.0)
    assert len(requested(sched.next_actions(11.0))) == 2


def test_a_refused_piece_is_asked_elsewhere_and_not_again_from_the_refuser() -> None:
    sched = make(1, endgame_threshold=0)
    sched.peer_update("a", [0], False, 0.0)
    [first] = sched.next_actions(0.0)
    assert first == RequestPiece("a", 0)
    sched.refused("a", 0, 1.0)
    assert sched.next_actions(1.0) == []
    sched.peer_update("b", [0], False, 2.0)
    assert sched.next_actions(2.0) == [RequestPiece("b", 0)]
    assert sched.statistics().refusals == 1


def test_a_busy_peer_rests_then_is_asked_again_for_the_piece_it_holds() -> None:
    sched = make(2, endgame_threshold=0, max_in_flight_per_peer=1, busy_backoff=1.0)
    sched.peer_update("a", [0, 1], False, 0.0)
    [first] = requested(sched.next_actions(0.0))
    sched.busy("a", first, 1.0)
    sched.tick(1.0)
    assert sched.next_actions(1.0) == []  # resting: nothing asked of it
    deadline = sched.next_deadline()
    assert deadline is not None and 1.5 <= deadline <= 2.5  # backoff ±50 %
    sched.peer_update("b", [first], False, 1.2)  # others are asked meanwhile
    assert sched.next_actions(1.2) == [RequestPiece("b", first)]
    sched.tick(deadline)
    [again] = requested(sched.next_actions(deadline), "a")  # it still holds both
    assert again == 1 - first
    assert sched.statistics().refusals == 1


def test_max_in_flight_caps_requests_over_all_peers_and_refills_as_pieces_arrive() -> None:
    sched = make(12, max_in_flight_per_peer=4, max_in_flight=5, endgame_threshold=0)
    for peer in "abc":
        sched.peer_update(peer, range(12), True, 0.0)
    first = [a for a in sched.next_actions(0.0) if isinstance(a, RequestPiece)]
    assert len(first) == 5 and sched.statistics().in_flight == 5
    sched.piece_received(first[0].peer_id, first[0].index, True, 1.0)
    sched.refused(first[1].peer_id, first[1].index, 1.0)
    more = requested(sched.next_actions(1.0))
    assert len(more) == 2 and sched.statistics().in_flight == 5
    assert first[0].index not in more  # held now


def test_a_bad_piece_blames_the_peer_and_is_asked_elsewhere() -> None:
    scores = PeerScores()
    sched = make(4, scores=scores, max_in_flight_per_peer=2, endgame_threshold=0)
    sched.peer_update("bad", range(4), True, 0.0)
    first = requested(sched.next_actions(0.0), "bad")
    sched.peer_update("good", range(4), True, 0.0)
    sched.piece_received("bad", first[0], False, 1.0)
    actions = sched.next_actions(1.0)
    assert CancelRequest("bad", first[1]) in actions
    assert sorted(requested(actions, "good")) == sorted(first)
    sched.peer_update("bad", range(4), True, 2.0)  # ignored from now on
    assert "bad" not in {a.peer_id for a in sched.next_actions(2.0) if isinstance(a, RequestPiece)}
    stats = sched.statistics()
    assert (stats.bad_pieces, stats.blamed) == (1, ("bad",))
    assert scores.offences("bad") == 1 and not scores.is_banned("bad")


def test_a_peer_is_banned_after_offences_in_several_blobs() -> None:
    scores = PeerScores(ban_after=2)
    bystander = make(8, scores=scores, max_in_flight_per_peer=1)
    bystander.peer_update("bad", range(8), True, 0.0)
    [held_by_bad] = requested(bystander.next_actions(0.0))
    for blob in range(2):
        sched = make(8, seed=blob, scores=scores)
        sched.peer_update("bad", range(8), True, 0.0)
        index = requested(sched.next_actions(0.0))[0]
        sched.piece_received("bad", index, False, 1.0)
        sched.piece_received("bad", index, False, 1.0)  # one offence per blob
    assert scores.offences("bad") == 2 and scores.banned() == ("bad",)
    assert bystander.next_actions(2.0) == [CancelRequest("bad", held_by_bad)]
    assert bystander.known("bad") == frozenset()
    fresh = make(8, scores=scores)
    fresh.peer_update("bad", range(8), True, 0.0)
    assert fresh.next_actions(0.0) == []
    assert fresh.wanted_upstream() == tuple(range(8))


def test_a_lost_peers_requests_are_requeued() -> None:
    sched = make(4, max_in_flight_per_peer=4, endgame_threshold=0)
    sched.peer_update("a", range(4), True, 0.0)
    assert len(requested(sched.next_actions(0.0))) == 4
    sched.peer_update("b", range(4), True, 0.0)
    sched.peer_gone("a", 1.0)
    assert sorted(requested(sched.next_actions(1.0), "b")) == [0, 1, 2, 3]


# -- endgame ---------------------------------------------------------------------------


def test_endgame_duplicates_the_tail_and_cancels_the_losers() -> None:
    sched = make(4, max_in_flight_per_peer=4, endgame_copies=2, endgame_threshold=4)
    sched.peer_update("a", range(4), True, 0.0)
    sched.peer_update("b", range(4), True, 0.0)
    actions = sched.next_actions(0.0)
    assert sorted(requested(actions, "a")) == sorted(requested(actions, "b")) == [0, 1, 2, 3]
    assert sched.statistics().duplicates == 4 and sched.in_endgame
    sched.piece_received("b", 2, True, 1.0)
    assert sched.next_actions(1.0) == [CancelRequest("a", 2)]
    sched.piece_received("a", 2, True, 1.5)  # arrived before the cancel did
    assert sched.statistics().redundant == 1


def test_endgame_copies_are_capped() -> None:
    sched = make(2, max_in_flight_per_peer=2, endgame_copies=2, endgame_threshold=2)
    for peer in "abcd":
        sched.peer_update(peer, range(2), True, 0.0)
    actions = sched.next_actions(0.0)
    assert sorted(requested(actions)) == [0, 0, 1, 1]
    assert sched.statistics().duplicates == 2


class _FillEveryPeer(Scheduler):
    """The endgame pass as written first: :meth:`Scheduler._fill` each idle, then each
    starved peer (what ``_fill_endgame`` must match, queues' order included)."""

    def _fill_endgame(self, now: float, out: list[Action]) -> None:
        for peer_id in [*self._idle, *self._starved]:
            self._fill(peer_id, now, True, out)


def test_the_endgame_pass_skips_peers_without_changing_a_thing() -> None:
    crowded = sum(_endgame_against_every_peer_filled(seed) for seed in range(150))
    assert crowded > 1000  # endgame turns with several idle peers to skip or fill


def _endgame_against_every_peer_filled(seed: int) -> int:
    """Drive both passes alike with ``seed``; the endgame turns with several idle peers."""
    chaos = random.Random(seed)
    options = {"max_in_flight_per_peer": chaos.choice([1, 2, 4]),
               "max_in_flight": chaos.choice([None, 2, 3, 6]), "endgame_threshold": 12,
               "endgame_copies": chaos.choice([2, 3]), "request_timeout": 3.0}
    fast = Scheduler(PieceLayout(16, 1), rng=random.Random(seed), **options)  # type: ignore[arg-type]
    plain = _FillEveryPeer(PieceLayout(16, 1), rng=random.Random(seed), **options)  # type: ignore[arg-type]
    peers = [f"p{i}" for i in range(10)]
    now, crowded = 0.0, 0
    while not fast.done and now < 300:
        if chaos.random() < 0.3:
            peer = chaos.choice(peers)
            holds = [i for i in range(16) if chaos.random() < 0.3]
            for sched in (fast, plain):
                sched.peer_update(peer, holds, False, now)
        crowded += fast.in_endgame and len(fast._idle) > 2
        actions = fast.next_actions(now)
        assert plain.next_actions(now) == actions
        assert list(fast._idle) == list(plain._idle)
        assert list(fast._starved) == list(plain._starved)
        for action in actions:
            if not isinstance(action, RequestPiece):
                continue
            roll = chaos.random()
            for sched in (fast, plain):
                if roll < 0.25:
                    sched.busy(action.peer_id, action.index, now)
                elif roll < 0.35:
                    sched.refused(action.peer_id, action.index, now)
                elif roll < 0.5:
                    pass  # stalls until the timeout (which halves the peer's allowance)
                else:
                    sched.piece_received(action.peer_id, action.index, True, now)
        now += 0.5
        fast.tick(now)
        plain.tick(now)
    assert fast.statistics() == plain.statistics()
    return crowded


@pytest.mark.parametrize(("pieces", "endgame"), [(8, 1), (16, 2), (40, 5), (64, 8), (1000, 8)])
def test_by_default_the_endgame_is_the_last_eighth_of_a_blob(pieces: int, endgame: int) -> None:
    assert endgame_size(pieces) == endgame and endgame_size(1) == endgame_size(0) == 1
    sched = make(pieces, max_in_flight_per_peer=pieces)
    sched.peer_update("a", range(pieces), True, 0.0)
    sched.peer_update("b", range(pieces), True, 0.0)
    assert len(requested(sched.next_actions(0.0))) == pieces  # each piece asked once
    for index in range(pieces - endgame - 1):  # one more than the endgame still missing
        sched.piece_received("a", index, True, 1.0)
    sched.next_actions(1.0)
    assert not sched.in_endgame and sched.statistics().duplicates == 0
    sched.piece_received("a", pieces - endgame - 1, True, 2.0)
    sched.next_actions(2.0)
    assert sched.in_endgame and sched.statistics().duplicates == endgame


def test_no_endgame_while_something_is_still_pending() -> None:
    sched = make(4, max_in_flight_per_peer=1, endgame_threshold=4)
    sched.peer_update("a", range(4), True, 0.0)
    sched.peer_update("b", range(4), True, 0.0)
    assert len(requested(sched.next_actions(0.0))) == 2
    assert not sched.in_endgame and sched.statistics().duplicates == 0


# -- upstream --------------------------------------------------------------------------


def test_only_unheld_pieces_inside_the_lease_are_fetched_upstream() -> None:
    sched = make(10)
    sched.peer_update("a", [7, 8, 9], False, 0.0)
    assert upstream(sched.next_actions(0.0)) == []  # no lease: wait for peers
    assert sched.wanted_upstream() == (0, 1, 2, 3, 4, 5, 6)
    sched.set_upstream_range(3, 9)
    assert upstream(sched.next_actions(0.0)) == [3, 4, 5, 6]
    sched.set_upstream_range(0, 10)  # a takeover widens the lease
    assert upstream(sched.next_actions(0.0)) == [0, 1, 2]
    assert sched.wanted_upstream() == ()


def test_fetching_upstream_lasts_while_pieces_of_the_lease_are_missing() -> None:
    sched = make(4)
    assert not sched.fetching_upstream  # no lease
    sched.set_upstream_range(1, 3)
    assert sched.fetching_upstream
    sched.upstream_received(1, 0.0)
    sched.piece_received("a", 2, True, 0.0)  # from a peer counts too: it is held
    assert not sched.fetching_upstream and not sched.done


def test_upstream_is_fetched_in_batches_topped_up_at_half() -> None:
    sched = make(20, upstream_batch=8, upstream_range=range(20))
    assert upstream(sched.next_actions(0.0)) == list(range(8))
    for index in range(3):
        sched.upstream_received(index, 1.0)
    assert sched.next_actions(1.0) == []  # 5 of 8 still in flight
    sched.upstream_received(3, 1.0)
    assert upstream(sched.next_actions(1.0)) == [8, 9, 10, 11]


def test_a_failed_upstream_piece_waits_before_the_retry() -> None:
    sched = make(2, upstream_range=range(2), upstream_retry_delay=1.0)
    assert upstream(sched.next_actions(0.0)) == [0, 1]
    sched.upstream_failed(1, 5.0)
    assert sched.next_actions(5.0) == []
    assert sched.next_deadline() == 6.0
    sched.tick(6.0)
    assert upstream(sched.next_actions(6.0)) == [1]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.lists(st.tuples(
    st.sampled_from(["busy", "refuse", "piece", "progress", "fail", "update", "nothing"]),
    st.sampled_from("abc"), st.integers(0, 7), st.floats(0.0, 0.6)), max_size=40))
def test_ticks_that_come_before_anything_is_due_change_nothing(
        seed: int, steps: list[tuple[str, str, int, float]]) -> None:
    """A tick before the earliest timeout, rest or upstream hold returns at once; one
    made to look every time (``_tick_at`` cleared) asks for exactly the same things.
    ``quiet_until`` is never later than the next deadline."""
    options = {"max_in_flight_per_peer": 2, "request_timeout": 1.0, "busy_backoff": 0.5,
               "upstream_retry_delay": 0.7, "upstream_range": range(4)}
    quick, full = make(8, seed, **options), make(8, seed, **options)
    asked: list[tuple[str, int]] = []
    upstream_asked: list[int] = []
    now = 0.0
    for kind, peer, pick, step in steps:
        now += step
        for sched in (quick, full):
            if kind == "update":
                sched.peer_update(peer, range(pick, 8), pick == 0, now)
            elif kind == "fail" and upstream_asked:
                sched.upstream_failed(upstream_asked[pick % len(upstream_asked)], now)
            elif kind != "nothing" and asked:
                holder, index = asked[pick % len(asked)]
                if kind == "busy":
                    sched.busy(holder, index, now)
                elif kind == "refuse":
                    sched.refused(holder, index, now)
                elif kind == "piece":
                    sched.piece_received(holder, index, True, now)
                elif kind == "progress":
                    sched.progress(holder, index, now)
        full._tick_at = -math.inf  # look at every timeout, rest and hold
        full.tick(now)
        quick.tick(now)
        actions = quick.next_actions(now)
        assert full.next_actions(now) == actions
        assert quick.next_deadline() == full.next_deadline()
        deadline = quick.next_deadline()
        assert quick.quiet_until <= (math.inf if deadline is None else deadline)
        assert quick.statistics() == full.statistics()
        asked += [(a.peer_id, a.index) for a in actions if isinstance(a, RequestPiece)]
        upstream_asked += upstream(actions)


def test_a_piece_whose_only_holder_left_becomes_an_upstream_candidate() -> None:
    sched = make(3, upstream_range=range(3))
    sched.peer_update("a", range(3), True, 0.0)
    assert len(requested(sched.next_actions(0.0))) == 3
    sched.peer_gone("a", 1.0)
    assert upstream(sched.next_actions(1.0)) == [0, 1, 2]


# -- whole downloads -------------------------------------------------------------------


def drive(seed: int, count: int = 60) -> tuple[list[Action], Scheduler]:
    """Download a blob from honest, bad, refusing and vanishing peers plus upstream."""
    chaos = random.Random(seed)
    sched = make(count, seed=seed, upstream_range=range(count // 2))
    peers = [f"p{i}" for i in range(8)]
    for peer in peers:
        holds = [i for i in range(count) if chaos.random() < 0.4]
        sched.peer_update(peer, holds, False, 0.0)
    log: list[Action] = []
    now = 0.0
    while not sched.done and now < 1000:
        actions = sched.next_actions(now)
        log.extend(actions)
        for action in actions:
            if isinstance(action, FetchUpstream):
                for index in action.indices:
                    sched.upstream_received(index, now)
            elif isinstance(action, RequestPiece):
                roll = chaos.random()
                if roll < 0.05:
                    sched.piece_received(action.peer_id, action.index, False, now)
                elif roll < 0.1:
                    sched.refused(action.peer_id, action.index, now)
                elif roll < 0.15:
                    continue  # stalls until the timeout
                else:
                    sched.piece_received(action.peer_id, action.index, True, now)
        if chaos.random() < 0.05:
            sched.peer_gone(chaos.choice(peers), now)
        if chaos.random() < 0.2:
            peer = chaos.choice(peers)
            sched.peer_update(peer, [i for i in range(count) if chaos.random() < 0.5], False, now)
        now += 1.0
        sched.tick(now)
    return log, sched


@pytest.mark.parametrize("seed", range(5))
def test_a_download_completes_from_peers_and_upstream(seed: int) -> None:
    _, sched = drive(seed)
    stats = sched.statistics()
    assert sched.done and sched.contiguous == 60 and stats.held == 60
    assert stats.pieces_from_peers + stats.pieces_from_upstream == 60
    assert stats.bytes_from_peers + stats.bytes_from_upstream == 60
    assert stats.pieces_from_peers > 0


def test_same_seed_and_events_give_the_same_actions() -> None:
    assert drive(3)[0] == drive(3)[0]
    assert drive(3)[0] != drive(4)[0]


def test_pieces_already_held_are_never_requested() -> None:
    sched = make(10, have=range(0, 10, 2))
    sched.peer_update("a", range(10), True, 0.0)
    sched.peer_update("b", range(10), True, 0.0)
    assert sorted(requested(sched.next_actions(0.0))) == [1, 3, 5, 7, 9]
    assert sched.contiguous == 1


def test_an_empty_blob_is_done_at_once() -> None:
    sched = make(0, upstream_range=range(0))
    assert sched.done and sched.next_actions(0.0) == [] and sched.next_deadline() is None


def test_a_full_download_of_500_pieces_from_50_peers_is_quick() -> None:
    """Not timed: finishing here in a plain loop shows no per-event work is quadratic."""
    count, rng = 500, random.Random(1)
    sched = make(count, seed=1, upstream_range=range(count))
    for peer in range(50):
        if peer < 5:
            sched.peer_update(f"n{peer}", range(count), True, 0.0)
        else:
            holds = [i for i in range(count) if rng.random() < 0.3]
            sched.peer_update(f"n{peer}", holds, False, 0.0)
    queue: deque[Action] = deque(sched.next_actions(0.0))
    now, steps = 0.0, 0
    while queue:
        action = queue.popleft()
        now += 0.001
        if isinstance(action, RequestPiece):
            sched.piece_received(action.peer_id, action.index, True, now)
            sched.peer_has(f"n{rng.randrange(5, 50)}", [action.index], now)
        elif isinstance(action, FetchUpstream):
            for index in action.indices:
                sched.upstream_received(index, now)
        queue.extend(sched.next_actions(now))
        steps += 1
    assert sched.done and steps < 2 * count


# -- InFlight and PeerScores -----------------------------------------------------------


def test_in_flight_book() -> None:
    book = InFlight(max_per_peer=2, timeout=5.0)
    book.add("a", 1, 0.0)
    book.add("b", 1, 0.0)
    assert 1 in book and len(book) == 2 and book.askers(1) == ("a", "b")
    assert book.free("a") == 1 and book.asked("a", 1) and not book.asked("a", 2)
    book.progress("b", 1, 3.0)
    assert not book.due(4.9) and book.due(5.0)
    assert book.expire(5.0) == [("a", 1)] and book.free("a") == 1
    assert book.next_deadline() == 8.0
    assert book.forget("b") == [1] and len(book) == 0 and book.next_deadline() is None
    with pytest.raises(ValueError):
        InFlight(max_per_peer=0, timeout=1.0)


def test_in_flight_askers_keep_the_order_asked_as_any_of_them_leaves() -> None:
    book = InFlight(max_per_peer=2, timeout=5.0)
    for peer in "abcd":
        book.add(peer, 3, 0.0)
    assert book.remove("a", 3)  # the first: the next in line takes its place
    assert book.askers(3) == ("b", "c", "d")
    assert book.remove("c", 3) and not book.remove("c", 3)
    assert book.askers(3) == ("b", "d") and 3 in book
    assert book.remove("b", 3) and book.askers(3) == ("d",)
    assert book.remove("d", 3)
    assert book.askers(3) == () and 3 not in book and len(book) == 0
    book.add("c", 3, 1.0)
    assert book.askers(3) == ("c",) and book.forget("c") == [3] and 3 not in book


def test_in_flight_forget_gives_a_peers_pieces_in_the_order_asked() -> None:
    book = InFlight(max_per_peer=4, timeout=5.0)
    book.add("q", 3, 0.0)
    book.add("p", 5, 1.0)
    book.add("p", 3, 2.0)  # a second copy of 3 (the endgame): q was asked first
    book.add("p", 1, 2.0)
    book.progress("p", 3, 4.0)  # its timeout restarts, q's does not
    assert book.pending_of("p") == 3 and book.free("p") == 1
    assert book.expire(5.0) == [("q", 3)] and book.askers(3) == ("p",)
    assert book.forget("p") == [5, 3, 1]
    assert len(book) == 0 and book.pending_of("p") == 0 and book.askers(3) == ()


def test_in_flight_timeouts_expire_in_deadline_order_restarted_ones_included() -> None:
    """A timeout restarted by progress takes its place among the later ones: the
    requests expire by deadline, and those due together in the order they were set."""
    book = InFlight(max_per_peer=4, timeout=5.0)
    book.add("a", 1, 0.0)  # due 5
    book.add("b", 1, 1.0)  # due 6
    book.add("c", 1, 3.0)  # due 8
    book.add("d", 1, 2.0)  # due 7 (an earlier now than the last: its place, not the back)
    book.progress("a", 1, 2.0)  # due 7 once its timeout comes up, after d's
    assert book.expire(5.0) == [] and book.next_deadline() == 6.0
    assert book.expire(7.0) == [("b", 1), ("d", 1), ("a", 1)]
    assert book.expire(8.0) == [("c", 1)] and book.next_deadline() is None


def test_peer_scores() -> None:
    scores = PeerScores(ban_after=2)
    scores.record_timeout("x")
    assert not scores.record_offence("x") and scores.version == 0
    assert scores.record_offence("x") and scores.version == 1
    assert scores.record_offence("x") and scores.version == 1
    stats = scores.statistics()
    assert (stats.peers, stats.offences, stats.timeouts, stats.banned) == (1, 3, 1, ("x",))
    with pytest.raises(ValueError):
        PeerScores(ban_after=0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(IndexError):
        make(4).peer_update("a", [4], False, 0.0)
    with pytest.raises(IndexError):
        make(4).piece_received("a", -1, True, 0.0)
    with pytest.raises(ValueError):
        make(4).set_upstream_range(2, 5)
    with pytest.raises(ValueError):
        make(4, max_in_flight_per_peer=0)


# -- the rule-based state machine ------------------------------------------------------

N = 12
PEERS = ("a", "b", "c", "d")
MAX = 2
TIMEOUT = 5.0
BATCH = 4
RETRY = 1.0
COPIES = 2
TOTAL = 5  # max_in_flight over all peers
BACKOFF = 1.0  # busy_backoff: a busy peer rests 0.5..1.5 of it

peers = st.sampled_from(PEERS)
pieces = st.integers(0, N - 1)


class SchedulerMachine(RuleBasedStateMachine):
    """Random events against a model of what the scheduler may and must do."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.known: dict[str, set[int]] = {}  # live, unblamed peers
        self.blamed: set[str] = set()
        self.banned: set[str] = set()  # blamed here or in another blob
        self.allowance: dict[str, int] = {}
        self.held: set[int] = set()
        self.asked: dict[tuple[str, int], float] = {}  # -> last progress
        self.up: set[int] = set()
        self.hold: dict[int, float] = {}
        self.lease = (0, 0)
        self.busy_at: dict[str, float] = {}  # last busy refusal per peer

    @initialize(
        seed=st.integers(0, 2**32), have=st.sets(pieces, max_size=3),
        threshold=st.sampled_from([0, 3]),
    )
    def start(self, seed: int, have: set[int], threshold: int) -> None:
        self.scores = PeerScores(ban_after=1)  # shared with the downloads of other blobs
        self.sched = make(
            N, seed=seed, have=have, max_in_flight_per_peer=MAX, request_timeout=TIMEOUT,
            endgame_threshold=threshold, upstream_batch=BATCH, upstream_retry_delay=RETRY,
            endgame_copies=COPIES, scores=self.scores, max_in_flight=TOTAL,
            busy_backoff=BACKOFF,
        )
        self.held = set(have)
        self.threshold = threshold

    # -- events ----------------------------------------------------------------------

    def _drop_requests(self, keep: Callable[[tuple[str, int]], bool]) -> None:
        self.asked = {k: v for k, v in self.asked.items() if keep(k)}

    @rule(peer=peers, holds=st.sets(pieces, max_size=6), complete=st.booleans(),
          as_bits=st.booleans())
    def update(self, peer: str, holds: set[int], complete: bool, as_bits: bool) -> None:
        if as_bits:  # the same, from a mask
            self.sched.peer_update_bits(peer, mask(range(N) if complete else holds), self.now)
        else:
            self.sched.peer_update(peer, holds, complete, self.now)
        if peer not in self.banned:
            self.known[peer] = set(range(N)) if complete else set(holds)
            self.allowance.setdefault(peer, MAX)

    @rule(peer=peers, holds=st.sets(pieces, max_size=3), as_bits=st.booleans())
    def have(self, peer: str, holds: set[int], as_bits: bool) -> None:
        if as_bits:
            self.sched.peer_has_bits(peer, mask(holds), self.now)
        else:
            self.sched.peer_has(peer, holds, self.now)
        if peer not in self.banned:
            self.known.setdefault(peer, set()).update(holds)
            self.allowance.setdefault(peer, MAX)

    @rule(peer=peers)
    def gone(self, peer: str) -> None:
        self.sched.peer_gone(peer, self.now)
        self.known.pop(peer, None)
        self.allowance.pop(peer, None)
        self._drop_requests(lambda k: k[0] != peer)

    @rule(data=st.data(), ok=st.booleans(), late=st.booleans())
    def receive(self, data: st.DataObject, ok: bool, late: bool) -> None:
        if self.asked and not late:
            peer, index = data.draw(st.sampled_from(sorted(self.asked)))
        else:
            peer, index = data.draw(peers), data.draw(pieces)
        self.sched.piece_received(peer, index, ok, self.now)
        if self.asked.pop((peer, index), None) is not None and ok and peer in self.known:
            self.allowance[peer] = min(MAX, self.allowance[peer] + 1)
        if ok:
            self.held.add(index)
            self._drop_requests(lambda k: k[1] != index)
        elif peer not in self.blamed:
            self.blamed.add(peer)
            self.banned.add(peer)
            self.known.pop(peer, None)
            self._drop_requests(lambda k: k[0] != peer)

    @rule(peer=peers)
    def banned_elsewhere(self, peer: str) -> None:
        self.scores.record_offence(peer)
        self.banned.add(peer)
        self.known.pop(peer, None)
        self._drop_requests(lambda k: k[0] != peer)
        self.step()  # the scheduler notices the ban when asked what to do

    @rule(data=st.data())
    def refuse(self, data: st.DataObject) -> None:
        if self.asked and data.draw(st.booleans()):
            peer, index = data.draw(st.sampled_from(sorted(self.asked)))
        else:
            peer, index = data.draw(peers), data.draw(pieces)
        self.sched.refused(peer, index, self.now)
        if peer in self.known:
            self.known[peer].discard(index)
            self.asked.pop((peer, index), None)

    @precondition(lambda self: bool(self.asked))
    @rule(data=st.data())
    def busy(self, data: st.DataObject) -> None:
        peer, index = data.draw(st.sampled_from(sorted(self.asked)))
        self.sched.busy(peer, index, self.now)
        del self.asked[(peer, index)]
        self.busy_at[peer] = self.now  # it still holds the piece

    def resting(self, peer: str) -> bool | None:
        """Whether ``peer`` must (True), may (None) or must not (False) be resting."""
        since = self.busy_at.get(peer)
        if since is None or since + 1.5 * BACKOFF <= self.now:
            return False
        return True if self.now < since + 0.5 * BACKOFF else None

    @precondition(lambda self: bool(self.asked))
    @rule(data=st.data())
    def progress(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.asked)))
        self.sched.progress(*key, self.now)
        self.asked[key] = self.now

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.sched.tick(self.now)
        for (peer, index), last in sorted(self.asked.items()):
            if last + TIMEOUT <= self.now:
                del self.asked[(peer, index)]
                self.known[peer].discard(index)
                self.allowance[peer] = max(1, self.allowance[peer] // 2)
        self.hold = {i: t for i, t in self.hold.items() if t > self.now}

    @precondition(lambda self: bool(self.up))
    @rule(data=st.data(), ok=st.booleans())
    def upstream_result(self, data: st.DataObject, ok: bool) -> None:
        index = data.draw(st.sampled_from(sorted(self.up)))
        self.up.discard(index)
        if ok:
            self.sched.upstream_received(index, self.now)
            self.held.add(index)
            self._drop_requests(lambda k: k[1] != index)
        else:
            self.sched.upstream_failed(index, self.now)
            if index not in self.held:
                self.hold[index] = self.now + RETRY

    @rule(start=st.integers(0, N), length=st.integers(0, N))
    def lease(self, start: int, length: int) -> None:
        self.lease = (start, min(N, start + length))
        self.sched.set_upstream_range(*self.lease)

    # -- the actions -----------------------------------------------------------------

    def holders(self, index: int) -> list[str]:
        return [p for p, held in self.known.items() if index in held]

    def pending(self, index: int) -> bool:
        return (
            index not in self.held
            and index not in self.up
            and all(i != index for _, i in self.asked)
        )

    @rule()
    def step(self) -> None:
        for action in self.sched.next_actions(self.now):
            if isinstance(action, RequestPiece):
                peer, index = action.peer_id, action.index
                assert peer not in self.banned
                assert index in self.known[peer]
                assert index not in self.held
                assert (peer, index) not in self.asked
                if not self.pending(index):
                    assert N - len(self.held) <= self.threshold  # duplicates only in the endgame
                self.asked[(peer, index)] = self.now
                assert sum(p == peer for p, _ in self.asked) <= self.allowance[peer] <= MAX
                assert sum(i == index for _, i in self.asked) + (index in self.up) <= COPIES
                assert len(self.asked) <= TOTAL
                assert self.resting(peer) is not True
            elif isinstance(action, CancelRequest):
                assert action.index in self.held or action.peer_id in self.banned
            else:
                for index in action.indices:
                    assert self.pending(index)
                    assert self.lease[0] <= index < self.lease[1]
                    assert not self.holders(index)
                    assert index not in self.hold
                    self.up.add(index)
        # nothing left undone: every peer with allowance left has nothing to be asked
        for peer, held in self.known.items():
            if len(self.asked) >= TOTAL or self.resting(peer) is not False:
                continue
            if sum(p == peer for p, _ in self.asked) < self.allowance[peer]:
                assert not [i for i in held if self.pending(i)], peer
        if len(self.up) * 2 <= BATCH:
            lo, hi = self.lease
            assert not [
                i for i in range(lo, hi)
                if self.pending(i) and not self.holders(i) and i not in self.hold
            ]

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def model_agrees(self) -> None:
        if not hasattr(self, "sched"):
            return
        stats = self.sched.statistics()
        assert stats.held == len(self.held) and self.sched.done == (len(self.held) == N)
        assert stats.in_flight == len(self.asked)
        assert stats.upstream_in_flight == len(self.up)
        assert set(stats.blamed) == self.blamed
        for peer in PEERS:
            assert self.sched.known(peer) == frozenset(self.known.get(peer, ()))
        wanted = [i for i in range(N) if self.pending(i) and not self.holders(i)]
        assert list(self.sched.wanted_upstream()) == wanted
        lo, hi = self.lease
        assert self.sched.wants_lease == any(not lo <= i < hi for i in wanted)


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase


def test_actions_compare_by_kind_and_fields() -> None:
    assert RequestPiece("a", 1) == RequestPiece("a", 1)
    assert hash(RequestPiece("a", 1)) == hash(RequestPiece("a", 1))
    assert RequestPiece("a", 1) != RequestPiece("a", 2)
    assert RequestPiece("a", 1) != RequestPiece("b", 1)
    assert RequestPiece("a", 1) != CancelRequest("a", 1)
    assert len({RequestPiece("a", 1), CancelRequest("a", 1), RequestPiece("a", 1)}) == 2
    assert repr(CancelRequest("a", 1)) == "CancelRequest(peer_id='a', index=1)"
