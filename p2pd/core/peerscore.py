"""How peers are judged: who is slow (per-blob requests) and who is bad (across blobs).

How it works. :class:`InFlight` is one download's book of requests to peers: who was
asked for which piece, and since when. Timeouts are progress-based: a request expires
``timeout`` after it was sent or last made progress (:meth:`InFlight.progress`), so a
slow but steady peer is never cut off. A peer's *allowance* — how many requests it may
have in flight — starts at ``max_per_peer``, halves on each timeout and grows back by one
per piece it delivers, so a stalling peer is soon asked for one piece at a time.
Pending timeouts wait in a queue in order of their deadlines (then of when they were
set): a request's deadline is ``timeout`` after ``now``, which only grows, so a new one
goes at the back, and only a restarted one (a timeout that found progress) is put in
its place from the back. A heap of them cost two tuple comparisons per level for every
request sent, for timeouts that a healthy swarm never sees fire.

:class:`PeerScores` lives as long as the daemon and is shared by the schedulers of all
blobs. A scheduler records an *offence* when a peer served a piece that failed its
sha256 check, at most one per peer per blob (the scheduler stops asking that peer for
the blob at the first bad piece). A peer with ``ban_after`` offences is *banned*: no
scheduler asks it for anything any more. Timeouts are counted for statistics only: a
slow peer is not a dishonest one. Every ban bumps :attr:`PeerScores.version`, so a
scheduler notices bans made elsewhere with one integer comparison.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

PeerId = str
"""A peer's node id (``[A-Za-z0-9][A-Za-z0-9._-]*``, as on the wire)."""


class _Request:
    __slots__ = ("alive", "deadline", "index", "last", "peer_id", "seq")

    def __init__(self, peer_id: PeerId, index: int, now: float, seq: int) -> None:
        self.peer_id, self.index, self.seq = peer_id, index, seq
        self.last, self.alive = now, True
        self.deadline = 0.0  # its timeout, while in InFlight._timers


def _sent_order(request: _Request) -> int:
    return request.seq


class InFlight:
    """The requests of one download awaiting an answer, with timeouts and allowances."""

    def __init__(self, *, max_per_peer: int, timeout: float) -> None:
        if max_per_peer < 1 or timeout <= 0:
            raise ValueError("max_per_peer must be at least 1 and timeout positive")
        self.max_per_peer, self.timeout = max_per_peer, timeout
        # A piece's requests in the order sent: the first, then any others (only the
        # endgame asks twice); of a peer, only how many. (Not a dict of requests per
        # peer: it would be made and dropped each time the peer's count goes from 0 to 1
        # and back, a few times per peer and blob; nor a list of askers per request.)
        self._first: dict[int, _Request] = {}
        self._others: dict[int, list[_Request]] = {}
        self._pending: dict[PeerId, int] = {}  # absent: none (10,000 nodes' worth)
        self._allowance: dict[PeerId, int] = {}  # absent: max_per_peer
        self._timers: deque[_Request] = deque()  # by deadline, then when queued
        self._count = self._sent = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, index: object) -> bool:
        """Whether piece ``index`` is asked from some peer."""
        return index in self._first

    def add(self, peer_id: PeerId, index: int, now: float) -> None:
        """Record that ``peer_id`` was asked for ``index`` at ``now`` (not asked for it
        already)."""
        self._sent += 1
        request = _Request(peer_id, index, now, self._sent)
        if index not in self._first:
            self._first[index] = request
        else:
            others = self._others.get(index)
            if others is None:
                others = self._others[index] = []
            others.append(request)
        self._pending[peer_id] = self._pending.get(peer_id, 0) + 1
        self._push(now + self.timeout, request)
        self._count += 1

    def remove(self, peer_id: PeerId, index: int) -> bool:
        """Forget the request for ``index`` from ``peer_id``; whether there was one."""
        request = self._first.get(index)
        if request is None:
            return False
        others = self._others.get(index) if self._others else None
        if request.peer_id == peer_id:
            if others is None:
                del self._first[index]
            else:  # the next one asked takes its place
                self._first[index] = others.pop(0)
        else:
            if others is None:
                return False
            for place, other in enumerate(others):  # noqa: B007 (used after the loop)
                if other.peer_id == peer_id:
                    break
            else:
                return False
            request = others.pop(place)
        if others is not None and not others:
            del self._others[index]
        request.alive = False
        left = self._pending[peer_id] - 1
        if left:
            self._pending[peer_id] = left
        else:
            del self._pending[peer_id]
        self._count -= 1
        return True

    def forget(self, peer_id: PeerId) -> list[int]:
        """Drop every request to ``peer_id`` and its allowance; the pieces it was asked
        for, in the order asked."""
        indices = []
        if peer_id in self._pending:
            mine = [r for r in self._first.values() if r.peer_id == peer_id]
            mine += [r for rs in self._others.values() for r in rs if r.peer_id == peer_id]
            mine.sort(key=_sent_order)
            indices = [r.index for r in mine]
        for index in indices:
            self.remove(peer_id, index)
        self._allowance.pop(peer_id, None)
        return indices

    def askers(self, index: int) -> tuple[PeerId, ...]:
        """The peers asked for ``index``, in the order they were asked."""
        first = self._first.get(index)
        if first is None:
            return ()
        others = self._others.get(index) if self._others else None
        if others is None:
            return (first.peer_id,)
        return (first.peer_id, *[other.peer_id for other in others])

    def asked(self, peer_id: PeerId, index: int) -> bool:
        """Whether ``peer_id`` is asked for ``index``."""
        return self._find(peer_id, index) is not None

    def pending_of(self, peer_id: PeerId) -> int:
        """How many requests ``peer_id`` has in flight."""
        return self._pending.get(peer_id, 0)

    def free(self, peer_id: PeerId) -> int:
        """How many more requests ``peer_id`` may be sent now (0 or more)."""
        allowance = self._allowance.get(peer_id, self.max_per_peer) if self._allowance \
            else self.max_per_peer  # (none lowered: the usual case, one lookup saved)
        return max(0, allowance - self._pending.get(peer_id, 0))

    def delivered(self, peer_id: PeerId) -> None:
        """``peer_id`` delivered a requested piece: its allowance grows by one."""
        allowance = self._allowance.get(peer_id)
        if allowance is None:
            return  # (absent: max_per_peer already)
        if allowance + 1 >= self.max_per_peer:
            del self._allowance[peer_id]
        else:
            self._allowance[peer_id] = allowance + 1

    def progress(self, peer_id: PeerId, index: int, now: float) -> None:
        """Bytes of ``index`` are arriving from ``peer_id``: restart its timeout."""
        request = self._find(peer_id, index)
        if request is not None:
            request.last = now

    def _find(self, peer_id: PeerId, index: int) -> _Request | None:
        request = self._first.get(index)
        if request is None or request.peer_id == peer_id:
            return request
        for other in self._others.get(index, ()) if self._others else ():
            if other.peer_id == peer_id:
                return other
        return None

    def due(self, now: float) -> bool:
        """Whether :meth:`expire` may have something to do at ``now`` (cheap)."""
        return bool(self._timers) and self._timers[0].deadline <= now

    def expire(self, now: float) -> list[tuple[PeerId, int]]:
        """Remove and return the requests without progress for ``timeout`` (halving the
        allowance of their peers), in order of expiry."""
        expired = []
        timers = self._timers
        while timers and timers[0].deadline <= now:
            request = timers.popleft()
            if not request.alive:
                continue
            peer_id, index = request.peer_id, request.index
            if request.last + self.timeout > now:  # progress was made: wait again
                self._push(request.last + self.timeout, request)
                continue
            self.remove(peer_id, index)
            allowance = self._allowance.get(peer_id, self.max_per_peer)
            self._allowance[peer_id] = max(1, allowance // 2)
            expired.append((peer_id, index))
        return expired

    def next_deadline(self) -> float | None:
        """When :meth:`expire` may next have something to do."""
        timers = self._timers
        while timers and not timers[0].alive:
            timers.popleft()
        return timers[0].deadline if timers else None

    def _push(self, deadline: float, request: _Request) -> None:
        """Queue ``request``'s timeout: after those due no later (set before it)."""
        request.deadline = deadline
        timers = self._timers
        if not timers or timers[-1].deadline <= deadline:
            timers.append(request)
            return
        position = len(timers) - 1  # a restarted timeout: its place, from the back
        while position and timers[position - 1].deadline > deadline:
            position -= 1
        timers.insert(position, request)


@dataclass(frozen=True, slots=True)
class PeerScoreStatistics:
    """A snapshot of the peer scores."""

    peers: int
    """Peers with at least one offence or timeout on record."""
    offences: int
    timeouts: int
    banned: tuple[PeerId, ...]
    """Banned peers, in the order they were banned."""


class PeerScores:
    """Offences and timeouts per peer across blobs; a peer is banned at ``ban_after`` offences."""

    def __init__(self, *, ban_after: int = 3) -> None:
        if ban_after < 1:
            raise ValueError("ban_after must be at least 1")
        self.ban_after = ban_after
        self.version = 0
        """Bumped on every new ban."""
        self._offences: dict[PeerId, int] = {}
        self._timeouts: dict[PeerId, int] = {}
        self._banned: dict[PeerId, None] = {}

    def record_offence(self, peer_id: PeerId) -> bool:
        """Count one offence (a blob it served a bad piece of); return whether it is banned."""
        count = self._offences.get(peer_id, 0) + 1
        self._offences[peer_id] = count
        if count >= self.ban_after and peer_id not in self._banned:
            self._banned[peer_id] = None
            self.version += 1
        return peer_id in self._banned

    def record_timeout(self, peer_id: PeerId) -> None:
        """Count one request that ``peer_id`` let time out (never leads to a ban)."""
        self._timeouts[peer_id] = self._timeouts.get(peer_id, 0) + 1

    def offences(self, peer_id: PeerId) -> int:
        """How many offences ``peer_id`` has on record."""
        return self._offences.get(peer_id, 0)

    def timeouts(self, peer_id: PeerId) -> int:
        """How many requests ``peer_id`` let time out."""
        return self._timeouts.get(peer_id, 0)

    def is_banned(self, peer_id: PeerId) -> bool:
        """Whether ``peer_id`` reached ``ban_after`` offences."""
        return peer_id in self._banned

    def banned(self) -> tuple[PeerId, ...]:
        """The banned peers, in the order they were banned."""
        return tuple(self._banned)

    def statistics(self) -> PeerScoreStatistics:
        """The current scores."""
        return PeerScoreStatistics(
            peers=len(self._offences.keys() | self._timeouts.keys()),
            offences=sum(self._offences.values()),
            timeouts=sum(self._timeouts.values()),
            banned=self.banned(),
        )
