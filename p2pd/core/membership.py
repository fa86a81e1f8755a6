"""Who is in the cluster, who is alive, and which member coordinates a blob.

There is no control plane: every node runs discovery (static list, DNS, mDNS) and its
own liveness bookkeeping, and every node computes a blob's coordinator with the same
rendezvous hash, so nodes that see the same members agree without talking.

How it works: discovery decides *who* is a member; :meth:`Membership.update` replaces
the set (members it no longer lists are forgotten; members listed again after leaving
start afresh). Liveness decides who among them is *alive*, from two kinds of evidence:

- positive: :meth:`~Membership.heard_from` (any successful exchange) clears failures;
  being listed by discovery again counts as having been heard of, but clears nothing,
  because DNS keeps listing a crashed pod for a while;
- negative: :meth:`~Membership.failed` (a refused connection, a timeout) starts a
  failure streak that only a success ends.

A member is ``SUSPECT`` while a failure streak is younger than ``drop_after`` or after
``suspect_after`` without any evidence, and ``DOWN`` (left out of :meth:`~Membership.alive`)
once a failure streak, or silence, has lasted ``drop_after``. Suspects still count as
alive, so one lost connection does not move every coordinator. Silence alone drops a
member only if discovery stops refreshing it: the io layer re-runs discovery (static
lists included) more often than ``drop_after``, so members that nobody happens to talk
to stay alive and all nodes keep the same view. This node itself is always alive.

A failed member comes back when heard from again; :meth:`~Membership.probe_candidates`
lists the members with a failure streak so the io layer can ping them.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Member:
    """A cluster member: its stable id and the address of its peer port."""

    node_id: str
    addr: str


class Liveness(enum.Enum):
    """What this node believes about a member."""

    ALIVE = "alive"
    SUSPECT = "suspect"  # still counted as alive
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class MembershipStatistics:
    """A snapshot of the membership: discovered members and how many are in each state."""

    members: int
    alive: int  # ALIVE or SUSPECT: those :meth:`Membership.alive` returns
    suspect: int
    down: int


@dataclass(slots=True)
class _Health:
    member: Member
    heard: float  # last positive evidence (a success or a discovery listing)
    failing_since: float | None  # start of the current failure streak


class Membership:
    """The discovered members of the cluster and their liveness, as seen by ``self_id``.

    ``self_addr``, if given, keeps this node a member even when discovery does not list
    it (mDNS, for one, does not see itself). Every ``now`` is a monotonic time in
    seconds; a ``now`` earlier than one already seen counts as the latest seen. Methods
    that read the state take ``now`` optionally and default to the latest seen.
    """

    def __init__(
        self,
        self_id: str,
        *,
        suspect_after: float,
        drop_after: float,
        self_addr: str | None = None,
    ) -> None:
        if not 0 < suspect_after <= drop_after:
            raise ValueError("need 0 < suspect_after <= drop_after")
        self.self_id = self_id
        self.self_addr = self_addr
        self.suspect_after = suspect_after
        self.drop_after = drop_after
        self._members: dict[str, _Health] = {}
        self._now = float("-inf")

    def _clock(self, now: float | None) -> float:
        if now is not None and now > self._now:
            self._now = now
        return self._now

    def update(self, members: Iterable[Member], now: float) -> None:
        """Replace the discovered set by ``members`` (if an id repeats, the last wins).

        Members not listed are forgotten. A listed member whose address changed is a new
        incarnation (a restarted pod) and starts afresh; the others count as heard of.
        """
        now = self._clock(now)
        listed = {member.node_id: member for member in members}
        known = self._members
        self._members = {}
        for node_id, member in listed.items():
            health = known.get(node_id)
            if health is None or health.member != member:
                health = _Health(member, now, None)
            health.heard = max(health.heard, now)
            self._members[node_id] = health

    def heard_from(self, node_id: str, now: float) -> None:
        """Record a successful exchange with ``node_id``: it is alive, its failures end.

        Nodes that discovery has not listed are ignored: discovery decides membership.
        """
        now = self._clock(now)
        health = self._members.get(node_id)
        if health is not None:
            health.heard = max(health.heard, now)
            health.failing_since = None

    def failed(self, node_id: str, now: float) -> None:
        """Record a failed exchange with ``node_id`` (connection refused, timeout, ...)."""
        now = self._clock(now)
        health = self._members.get(node_id)
        if health is not None and health.failing_since is None:
            health.failing_since = now

    def status(self, node_id: str, now: float | None = None) -> Liveness | None:
        """The liveness of ``node_id``, or ``None`` if it is not a member."""
        now = self._clock(now)
        health = self._members.get(node_id)
        if health is None:
            if node_id == self.self_id and self.self_addr is not None:
                return Liveness.ALIVE
            return None
        return self._liveness(health, now)

    def _liveness(self, health: _Health, now: float) -> Liveness:
        if health.member.node_id == self.self_id:
            return Liveness.ALIVE
        if health.failing_since is not None:
            failing = now - health.failing_since
            return Liveness.DOWN if failing >= self.drop_after else Liveness.SUSPECT
        silent = now - health.heard
        if silent >= self.drop_after:
            return Liveness.DOWN
        return Liveness.SUSPECT if silent >= self.suspect_after else Liveness.ALIVE

    def members(self) -> list[Member]:
        """Every member, alive or not, sorted by node id."""
        return self._sorted(h.member for h in self._members.values())

    def alive(self, now: float | None = None) -> list[Member]:
        """The members that are not down (this node included), sorted by node id."""
        now = self._clock(now)
        return self._sorted(
            h.member for h in self._members.values()
            if self._liveness(h, now) is not Liveness.DOWN
        )

    def probe_candidates(self, now: float | None = None) -> list[Member]:
        """Members in a failure streak (suspect or down), which the io layer may ping."""
        self._clock(now)
        return self._sorted(
            h.member for h in self._members.values()
            if h.failing_since is not None and h.member.node_id != self.self_id
        )

    def statistics(self, now: float | None = None) -> MembershipStatistics:
        """Counts of members by liveness."""
        now = self._clock(now)
        counts = dict.fromkeys(Liveness, 0)
        for health in self._members.values():
            counts[self._liveness(health, now)] += 1
        members = len(self._members)
        if self.self_id not in self._members and self.self_addr is not None:
            members += 1
            counts[Liveness.ALIVE] += 1
        return MembershipStatistics(
            members=members,
            alive=counts[Liveness.ALIVE] + counts[Liveness.SUSPECT],
            suspect=counts[Liveness.SUSPECT],
            down=counts[Liveness.DOWN],
        )

    def _sorted(self, members: Iterable[Member]) -> list[Member]:
        result = list(members)
        if self.self_addr is not None and self.self_id not in self._members:
            result.append(Member(self.self_id, self.self_addr))
        result.sort(key=lambda member: member.node_id)
        return result


def rendezvous_weight(node_id: str, digest: str) -> int:
    """The highest-random-weight score of ``node_id`` for ``digest``.

    ``sha256(node_id + "\\0" + digest)`` read as a big-endian integer: every node
    computes the same number, and each member's scores are independent and uniform.
    """
    data = f"{node_id}\0{digest}".encode()
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def _rank(digest: str) -> Callable[[Member], tuple[int, str, str]]:
    """Sort key: highest weight first; ids (then addresses) break the impossible ties."""

    def key(member: Member) -> tuple[int, str, str]:
        return (-rendezvous_weight(member.node_id, digest), member.node_id, member.addr)

    return key


def rendezvous_order(digest: str, members: Sequence[Member]) -> list[Member]:
    """``members`` by decreasing rendezvous weight for ``digest``.

    The order depends only on the set of members, never on the order they are given in.
    If the first one leaves, the others keep their order: the second becomes first,
    which is how coordinator state moves to exactly one successor.
    """
    return sorted(members, key=_rank(digest))


def coordinator_for(digest: str, alive_members: Sequence[Member]) -> Member:
    """The coordinator of ``digest``: the first of :func:`rendezvous_order`.

    Raises :class:`ValueError` if there are no members (with ``self_addr`` set, a
    node's own :meth:`Membership.alive` never is empty).
    """
    if not alive_members:
        raise ValueError("no live members to coordinate a blob")
    return min(alive_members, key=_rank(digest))
