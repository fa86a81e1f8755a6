"""Fetching a blob with the other daemons: peers first, upstream only under a lease.

How it works: every blob has a coordinator, the live member with the highest rendezvous
hash for its digest (``p2pd.core.membership``), so every node finds the same one without
asking anybody. The coordinator keeps soft state (``p2pd.core.coordinator``): who holds
which pieces, the piece table, and the upstream lease. A node downloading a blob looks
the swarm up at its coordinator, feeds the holders to its piece scheduler
(``p2pd.core.scheduler``), asks peers for pieces over the peer port and verifies each
against the table, and asks the coordinator for a lease before fetching anything from
the registry: when every node starts at once, one of them gets the lease and the rest
take the pieces from it as they arrive. A node asks for one lease at a time, and while
it fetches one blob from upstream it waits :data:`LEASE_DEFER` before asking for
another's (unless it is alone), so the layers of an image pulled everywhere at once are
fetched by several nodes, not all through the first asker's link. Each node announces
what it holds as it goes (with the hashes it has not told that coordinator yet) and,
for complete blobs, every :data:`REANNOUNCE` seconds, so a new coordinator rebuilds its
state within that time. A node answering a piece request first sends the asker a
``HAVE`` of its pieces when they changed since it last told it, so trading partners
learn each other's progress between lookups. A coordinator with many askers answers
with holders drawn at random (``p2pd.core.coordinator``), and forgets the holders
membership finds down.
Whatever goes wrong with peers or the coordinator, the node falls back to fetching from
the registry itself: a pull never fails for want of peers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from p2pd.core.bitfield import (
    bitfield_of_mask,
    indices_of_mask,
    mask_of_bitfield,
    pack_bitfield,
)
from p2pd.core.coordinator import Coordinator, HolderInfo
from p2pd.core.membership import (
    Liveness,
    Member,
    Membership,
    coordinator_for,
    rendezvous_order,
)
from p2pd.core.messages import (
    REFUSE_BUSY,
    Announce,
    Have,
    Holder,
    Lease,
    LeaseGrant,
    Lookup,
    Peers,
    Piece,
    Refuse,
    Replicate,
    Replicated,
    Request,
)
from p2pd.core.peerscore import PeerScores
from p2pd.core.pieces import PieceLayout, piece_size_for
from p2pd.core.scheduler import FetchUpstream, RequestPiece, Scheduler
from p2pd.core.tuning import (
    ANNOUNCE_DELAY,
    GONE_RETRY,
    HOLDER_TTL,
    LEASE_DEFER,
    LEASE_RETRY,
    LEASE_TTL,
    LOOKUP_INTERVAL,
    LOOKUP_TIMEOUT,
    MAX_IN_FLIGHT,
    MISSING_RETRY,
    REANNOUNCE,
    RPC_TIMEOUT,
    STUCK_AFTER,
    lookup_wait,
    request_share,
)
from p2pd.errors import P2PError
from p2pd.io.peer import PeerLink, PeerUnavailable, open_peer_link
from p2pd.io.throttle import Throttle

log = logging.getLogger(__name__)

PIECE_TIMEOUT = 30.0
"""A piece request given up for good (the scheduler re-asks elsewhere long before)."""
ZERO = bytes(32)

StorePiece = Callable[[int, bytes, str], Awaitable[bool]]
"""``(index, data, source)``: store a piece whose hash matched; False if it did not."""
FetchRange = Callable[[int, int, Callable[[int, bytes], Awaitable[None]]], Awaitable[None]]
"""``(first, stop, on_piece)``: fetch pieces ``first..stop-1`` upstream, each to ``on_piece``."""


@dataclass
class BlobState:
    """What this node holds of one blob, as announced to its coordinator.

    ``taught``: the coordinator (its address) last sent an announcement, and the pieces
    whose hashes it was sent: the next announcement to it carries only the others'.
    A new coordinator (or this node's first announcement) gets the whole table.
    """

    digest: str
    size: int
    count: int
    held: set[int]
    hashes: list[bytes | None]
    taught: tuple[str, int] = ("", 0)

    def announce(self, addr: str, coordinator: str) -> tuple[Announce, int]:
        """The announcement for ``coordinator``, and the pieces it teaches the hashes of."""
        told = self.taught[1] if self.taught[0] == coordinator else 0
        hashes = self.hashes
        new = [i for i in sorted(self.held) if not told >> i & 1 and hashes[i] is not None]
        table = b"".join(hashes[i] or ZERO for i in new)
        msg = Announce(self.digest, self.size, piece_size_for(self.size),
                       pack_bitfield(self.held, self.count), len(self.held) == self.count,
                       addr, pack_bitfield(new, self.count), table)
        return msg, told | sum(1 << i for i in new)


class Swarm:
    """This node's part in the swarm: coordinator for some digests, downloader of others."""

    def __init__(
        self, *, node_id: str, addr: str, secret: bytes | None, membership: Membership,
        rng: random.Random, nursery: trio.Nursery,
        on_peer_bytes: Callable[[int], None] = lambda n: None,
        on_blame: Callable[[], None] = lambda: None,
        on_request: Callable[[str], None] = lambda kind: None,
        download: Throttle | None = None,
    ) -> None:
        self.node_id = node_id
        self.addr = addr
        self.secret = secret
        self.membership = membership
        self.rng = rng
        self.coordinator = Coordinator(rng=rng, holder_ttl=HOLDER_TTL, lease_ttl=LEASE_TTL)
        self.scores = PeerScores()
        self._nursery = nursery
        self._links: dict[tuple[str, bool], PeerLink] = {}  # (addr, control) -> link
        self._connecting: dict[tuple[str, bool], trio.Event] = {}
        self._on_peer_bytes = on_peer_bytes
        self._on_blame = on_blame
        self._on_request = on_request
        self.download = download
        self.held: dict[str, BlobState] = {}
        self._fetches: list[_Fetch] = []
        # holders and the last piece table as sent in lookup answers (by the id of the
        # coordinator's object, kept too so that the id stays its own)
        self._holders: dict[int, tuple[HolderInfo, Holder]] = {}
        self._tables: tuple[tuple[bytes | None, ...], bytes] = ((), b"")

    # -- the coordinator side (called by the peer port) ---------------------------------

    def on_announce(self, peer_id: str, msg: Announce) -> None:
        """A node tells us, its blob's coordinator, what it holds."""
        self._on_request("announce")
        now = trio.current_time()
        count = _count(msg.size)
        pieces = mask_of_bitfield(msg.bitfield, count)
        table = {i: msg.hashes[32 * n:32 * n + 32] for n, i in
                 enumerate(indices_of_mask(mask_of_bitfield(msg.hashed, count)))} \
            if msg.hashes else {}
        self.coordinator.announce(msg.digest, msg.size, peer_id, msg.addr, pieces,
                                  msg.complete, table, now)
        self.membership.heard_from(msg.addr, now)

    def on_lookup(self, peer_id: str, msg: Lookup) -> Peers:
        """Who holds pieces of a blob, and its piece table."""
        self._on_request("lookup")
        found = self.coordinator.lookup(msg.digest, msg.size, peer_id, trio.current_time())
        count = _count(msg.size)
        holders = tuple(self._holder(h, count) for h in found.holders[:64])
        table = self._table(found.hashes)
        fetcher = found.fetchers[0].node_id if found.fetchers else None
        return Peers(msg.request_id, msg.digest, msg.size, holders, fetcher, table)

    def _holder(self, info: HolderInfo, count: int) -> Holder:
        """``info`` as a message, built once per announcement: in a busy swarm the same
        holder goes into dozens of answers between two of its announcements."""
        cached = self._holders.get(id(info))
        if cached is not None and cached[0] is info:
            return cached[1]
        holder = Holder(info.node_id, info.addr, bitfield_of_mask(info.bits, count),
                        info.complete)
        if len(self._holders) >= 20_000:
            self._holders.clear()
        self._holders[id(info)] = (info, holder)
        return holder

    def _table(self, hashes: tuple[bytes | None, ...]) -> bytes:
        """The piece table as sent in ``PEERS`` (kept until the coordinator's changes)."""
        if self._tables[0] is not hashes:
            joined = b"".join(h or ZERO for h in hashes) if any(hashes) else b""
            self._tables = (hashes, joined)
        return self._tables[1]

    def on_lease(self, peer_id: str, msg: Lease) -> LeaseGrant:
        """Grant the upstream lease of a blob's missing pieces, or say who holds it."""
        self._on_request("lease")
        now = trio.current_time()
        lease = self.coordinator.request_lease(msg.digest, msg.size, peer_id, now)
        if lease is not None:
            return LeaseGrant(msg.request_id, msg.digest, msg.size, lease.first_piece,
                              lease.last_piece - 1, True, peer_id)
        others = self.coordinator.leases(msg.digest, msg.size, now)
        if others:
            first = others[0]
            return LeaseGrant(msg.request_id, msg.digest, msg.size, first.first_piece,
                              first.last_piece - 1, False, first.node_id)
        return LeaseGrant(msg.request_id, msg.digest, msg.size, msg.first_piece,
                          msg.last_piece, False, self.node_id)

    # -- talking to peers ----------------------------------------------------------------

    async def _link(self, addr: str, *, control: bool = False) -> PeerLink:
        """The connection to ``addr`` for pieces, or (``control``) the one for coordinator
        messages: kept apart, so a lookup never waits behind megabytes of pieces in the
        same TCP stream."""
        key = (addr, control)
        while key not in self._links and key in self._connecting:
            await self._connecting[key].wait()
        if key in self._links:
            return self._links[key]
        self._connecting[key] = trio.Event()
        try:
            link: PeerLink = await self._nursery.start(self._hold_link, key)
        finally:
            self._connecting.pop(key).set()
        return link

    async def _hold_link(
        self, key: tuple[str, bool], *,
        task_status: trio.TaskStatus[PeerLink] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        addr, control = key
        try:
            async with open_peer_link(addr, self.node_id, self.secret, rng=self.rng,
                                      download=None if control else self.download,
                                      on_have=None if control else self._on_have) as link:
                self._links[key] = link
                task_status.started(link)
                await link.closed.wait()
        finally:
            self._links.pop(key, None)

    def _on_have(self, peer_id: str, msg: Have) -> None:
        for fetch in self._fetches:
            if fetch.digest == msg.digest and fetch.size == msg.size:
                fetch.on_have(peer_id, msg)

    def forget_down(self, now: float) -> None:
        """Drop the holders that membership finds down from what we coordinate."""
        membership = self.membership
        self.coordinator.forget_at({m.addr for m in membership.members()
                                    if membership.status(m.node_id, now) is Liveness.DOWN})

    def _coordinator(self, digest: str) -> Member:
        return coordinator_for(digest, self.membership.alive(trio.current_time()))

    async def _ask(self, digest: str, make: Callable[[int], Lookup | Lease],
                   timeout: float = RPC_TIMEOUT) -> Peers | LeaseGrant:
        """Send a coordinator query for ``digest`` (answered locally if we coordinate it);
        :class:`CoordinatorSlow` if no answer came within ``timeout``."""
        member = self._coordinator(digest)
        if member.addr == self.addr:
            query = make(0)
            return self.on_lookup(self.node_id, query) if isinstance(query, Lookup) \
                else self.on_lease(self.node_id, query)
        try:
            with trio.fail_after(timeout):
                answer = await (await self._link(member.addr, control=True)).call(make)
        except trio.TooSlowError as exc:
            # Connected, but no answer yet: a coordinator with thousands of askers works
            # through their messages one by one. It is alive: not a membership failure.
            raise CoordinatorSlow(f"coordinator {member.addr}: no answer in "
                                  f"{timeout:.0f} s") from exc
        except PeerUnavailable as exc:
            self.membership.failed(member.addr, trio.current_time())
            raise PeerUnavailable(f"coordinator {member.addr}: {exc!r}") from exc
        self.membership.heard_from(member.addr, trio.current_time())
        if not isinstance(answer, (Peers, LeaseGrant)):
            raise PeerUnavailable(f"coordinator {member.addr} answered {type(answer).__name__}")
        return answer

    async def announce(self, state: BlobState) -> None:
        """Tell the blob's coordinator what we hold (best effort)."""
        member = self._coordinator(state.digest)
        msg, taught = state.announce(self.addr, member.addr)
        if member.addr == self.addr:
            self.on_announce(self.node_id, msg)
            state.taught = (member.addr, taught)
            return
        try:
            with trio.fail_after(RPC_TIMEOUT):
                link = await self._link(member.addr, control=True)
        except (PeerUnavailable, trio.TooSlowError) as exc:
            self.membership.failed(member.addr, trio.current_time())
            log.debug("announce %s to %s failed: %s", state.digest[7:19], member.addr, exc)
            return
        # Connected but not reading within RPC_TIMEOUT: busy, not gone (as CoordinatorSlow);
        # this announcement is dropped, the next one repeats what it said.
        try:
            with trio.fail_after(RPC_TIMEOUT):
                await link.send(msg)
            state.taught = (member.addr, taught)
        except trio.TooSlowError:
            log.debug("announce %s to %s: coordinator busy", state.digest[7:19], member.addr)
        except PeerUnavailable as exc:
            self.membership.failed(member.addr, trio.current_time())
            log.debug("announce %s to %s failed: %s", state.digest[7:19], member.addr, exc)

    async def reannounce_forever(self, complete: Callable[[], list[BlobState]]) -> None:
        """Announce every complete blob again every :data:`REANNOUNCE` seconds."""
        while True:
            await trio.sleep(REANNOUNCE)
            for state in complete():
                await self.announce(state)

    # -- downloading ---------------------------------------------------------------------

    async def fetch(
        self, digest: str, size: int, store: StorePiece, fetch_range: FetchRange,
        state: BlobState, *, peers_only: bool = False,
    ) -> None:
        """Get every piece of a blob into ``store``, from peers where possible.

        With ``peers_only`` (a preheat replica, fetched without registry credentials)
        upstream is never asked: where the daemon would go upstream, the fetch fails with
        :class:`NoPeerHolds` instead.
        """
        fetch = _Fetch(self, digest, size, store, fetch_range, state, peers_only)
        self._fetches.append(fetch)
        self._share_requests()
        try:
            await fetch.run()
        finally:
            self._fetches.remove(fetch)
            self._share_requests()

    def placement(self, digest: str, replicas: int) -> list[Member]:
        """The ``replicas`` live members a preheat puts ``digest`` on: the head of its
        rendezvous order, the coordinator first, the same order every node computes."""
        return rendezvous_order(digest, self.membership.alive(trio.current_time()))[:replicas]

    async def replicate_to(self, addr: str, digest: str, size: int) -> str:
        """Have the node at ``addr`` bring ``digest`` into its cache from the swarm (a
        preheat); its ``REPLICATED_*`` answer once it holds the blob or gave up."""
        link = await self._link(addr, control=True)
        answer = await link.call(lambda rid: Replicate(rid, digest, size))
        if not isinstance(answer, Replicated):
            raise PeerUnavailable(f"peer {addr} answered {type(answer).__name__}")
        self.membership.heard_from(addr, trio.current_time())
        return answer.reason

    def leasing(self, besides: _Fetch) -> bool:
        """Whether a download other than ``besides`` is asking for its upstream lease."""
        return any(f.leasing for f in self._fetches if f is not besides)

    def fetching_upstream(self, besides: _Fetch) -> bool:
        """Whether a download other than ``besides`` holds an upstream lease with pieces
        still to fetch, and other daemons are alive to take further leases."""
        return any(f.sched.fetching_upstream for f in self._fetches if f is not besides) and \
            len(self.membership.alive(trio.current_time())) > 1

    def _wake_all(self) -> None:
        for fetch in self._fetches:
            fetch.wake.set()

    def _share_requests(self) -> None:
        """Split the node's request budget among the downloads in progress."""
        fetches = self._fetches
        share = request_share(len(fetches))
        for fetch in fetches:
            fetch.sched.set_max_in_flight(share)
        self._wake_all()


class CoordinatorSlow(PeerUnavailable):
    """The coordinator did not answer within :data:`RPC_TIMEOUT` (it is busy, not gone)."""


class NoPeerHolds(P2PError):
    """A peers-only fetch (a preheat replica) found no peer to give it every piece."""


class _Fetch:
    """One blob's download through the swarm (see the module docstring)."""

    def __init__(
        self, swarm: Swarm, digest: str, size: int, store: StorePiece,
        fetch_range: FetchRange, state: BlobState, peers_only: bool,
    ) -> None:
        self.swarm, self.digest, self.size = swarm, digest, size
        self.peers_only = peers_only
        self.layout = PieceLayout.for_size(size)
        self.store, self.fetch_range, self.state = store, fetch_range, state
        self.sched = Scheduler(self.layout, rng=swarm.rng, scores=swarm.scores,
                               max_in_flight=MAX_IN_FLIGHT)
        self.addrs: dict[str, str] = {}
        self.wake = trio.Event()
        self.announce_due = False
        self.upstream = range(0)  # pieces we may fetch upstream (our lease)
        self.leasing = False  # asking the coordinator for the lease now
        self.lookup_time = 0.0  # how long the last lookup took to answer (or to give up on)
        self.answer_time = 0.0  # how long the last answered lookup took
        self.seen = 0  # pieces lookups showed held by someone (a mask)
        self.answered = False  # a lookup was answered (or the first one given up on)
        self.solo = False
        # pieces a peer said it lacks although announced, and until when to believe it
        self.refused: dict[str, dict[int, float]] = {}
        self.gone: dict[str, float] = {}  # peers found unreachable: until when to skip
        self.last_progress = trio.current_time()

    def _poke(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        next_lease = 0.0
        deferred = False  # the first lease request, while this node fetches another blob
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announcer)
            # the first turn knows the swarm
            await self._lookup(trio.current_time())
            nursery.start_soon(self._lookups)
            while not self.sched.done:
                now = trio.current_time()
                wanted = self.sched.wants_lease
                if wanted and now >= next_lease and not self.peers_only:
                    if self.swarm.leasing(besides=self):
                        pass  # one lease request at a time: its answer wakes us
                    elif not deferred and self.swarm.fetching_upstream(besides=self):
                        deferred, next_lease = True, now + LEASE_DEFER
                    else:
                        await self._lease(now)
                        next_lease = now + LEASE_RETRY
                # Pieces that only blamed or vanished peers claim, or whose fetcher
                # stalls while the coordinator still counts its lease: stop waiting.
                # (plus the time the coordinator takes to answer: we learn of progress
                # elsewhere no sooner than that)
                if now - self.last_progress > STUCK_AFTER + self.answer_time \
                        and not self.sched.in_flight:
                    self._go_solo(f"no piece arrived for {STUCK_AFTER:.0f} s")
                self.sched.tick(now)
                for action in self.sched.next_actions(now):
                    if isinstance(action, RequestPiece):
                        nursery.start_soon(self._from_peer, action.peer_id, action.index)
                    elif isinstance(action, FetchUpstream):
                        nursery.start_soon(self._from_upstream, action.indices)
                if self.sched.done:
                    break
                latest = now + LOOKUP_INTERVAL  # a look at the clock now and then (STUCK_AFTER)
                deadline = min(latest, self.sched.next_deadline() or latest)
                with trio.move_on_at(max(deadline, trio.current_time() + 0.01)):
                    await self.wake.wait()
                self.wake = trio.Event()
            nursery.cancel_scope.cancel()
        await self.swarm.announce(self.state)

    async def _lookups(self) -> None:
        """Look the swarm up, one lookup at a time, ``lookup_wait`` after each answer
        (longer after a slow one: :data:`~p2pd.core.tuning.LOOKUP_BACKOFF`).

        Beside the loop, not in it: a coordinator with many askers answers slowly (it
        works through their lookups one after another), and a loop that waited for
        the answer would ask peers for nothing meanwhile. One at a time, so a slow
        coordinator slows its askers' lookups down instead of being sent more."""
        while not self.solo:
            # a slow answer means a queue at the coordinator: back off in proportion
            answered_in = self.lookup_time if self.lookup_time < LOOKUP_TIMEOUT else 0.0
            await trio.sleep(lookup_wait(self.swarm.rng, answered_in=answered_in))
            if self.solo:
                break
            await self._lookup(trio.current_time())
            self._poke()

    async def _lookup(self, now: float) -> None:
        try:
            answer = await self.swarm._ask(
                self.digest, lambda rid: Lookup(rid, self.digest, self.size), LOOKUP_TIMEOUT)
            self.lookup_time = self.answer_time = trio.current_time() - now
        except CoordinatorSlow as exc:  # look again later; peers meanwhile
            self.lookup_time = LOOKUP_TIMEOUT
            if not self.answered:  # STUCK_AFTER counts from our first view of the swarm
                self.answered = True  # or from giving up waiting for it
                self.last_progress = trio.current_time()
            log.info("blob %s: %s", self.digest[7:19], exc)
            return
        except (PeerUnavailable, P2PError) as exc:
            self.solo = True
            self._go_solo(f"coordinator unreachable: {exc}")
            return
        assert isinstance(answer, Peers)
        state, forgotten = self.state, False
        for i in range(self.layout.count) if answer.hashes else ():
            value = answer.hashes[32 * i:32 * i + 32]
            if value == ZERO:
                forgotten = forgotten or (i in state.held and state.hashes[i] is not None)
            elif state.hashes[i] is None:
                state.hashes[i] = value
        if forgotten or (not answer.hashes and state.held):
            # The coordinator lacks hashes we taught it (it restarted, or is new at the
            # same address): the next announcement carries our whole table again.
            state.taught = ("", 0)
        seen, count = self.seen, self.layout.count
        for holder in answer.holders:
            held = mask_of_bitfield(holder.bitfield, count)
            seen |= held
            if holder.addr == self.swarm.addr:
                continue
            self.addrs[holder.node_id] = holder.addr
            self._feed(holder.node_id, held, now)
        fetcher = answer.fetcher not in (None, self.swarm.node_id)
        if seen != self.seen or fetcher or not self.answered:
            # the swarm makes progress, or someone else fetches upstream: not stuck
            self.seen, self.last_progress = seen, trio.current_time()
        self.answered = True

    def _feed(self, peer_id: str, held: int, now: float) -> None:
        """Tell the scheduler which pieces ``peer_id`` holds: those whose hash we know
        (we could not check the others) and that it did not refuse lately."""
        if self.gone.get(peer_id, 0.0) > now:
            return
        lacks, hashes = self.refused.get(peer_id, {}), self.state.hashes
        for i in indices_of_mask(held):
            if hashes[i] is None or lacks.get(i, 0.0) > now:
                held &= ~(1 << i)
        self.sched.peer_update_bits(peer_id, held, now)

    def on_have(self, peer_id: str, msg: Have) -> None:
        """A peer we asked for a piece told us what it holds now (``HAVE``)."""
        if peer_id not in self.addrs or self.sched.done:
            return
        held = mask_of_bitfield(msg.bitfield, self.layout.count)
        now = trio.current_time()
        if held & ~self.seen:  # the swarm makes progress: not stuck
            self.seen, self.last_progress = self.seen | held, now
        self._feed(peer_id, held, now)
        self._poke()

    async def _lease(self, now: float) -> None:
        self.leasing = True
        try:
            grant = await self.swarm._ask(self.digest, lambda rid: Lease(
                rid, self.digest, self.size, 0, self.layout.count - 1))
        except CoordinatorSlow as exc:  # ask again after LEASE_RETRY
            log.info("blob %s: %s", self.digest[7:19], exc)
            return
        except (PeerUnavailable, P2PError) as exc:
            self.solo = True
            self._go_solo(f"coordinator unreachable: {exc}")
            return
        finally:
            self.leasing = False
            self.swarm._wake_all()  # downloads waiting for this answer to ask theirs
        assert isinstance(grant, LeaseGrant)
        if grant.granted and not self.solo:
            self.upstream = range(grant.first_piece, grant.last_piece + 1)
            self.sched.set_upstream_range(self.upstream.start, self.upstream.stop)
            log.info("blob %s: upstream lease for pieces %d-%d", self.digest[7:19],
                     grant.first_piece, grant.last_piece)

    def _go_solo(self, why: str) -> None:
        """Fetch from upstream whatever no usable peer holds (peers still serve the rest)."""
        if self.peers_only:
            raise NoPeerHolds(f"blob {self.digest[7:19]}: {why}, and it may not go upstream")
        if len(self.upstream) < self.layout.count:
            log.warning("blob %s: %s; fetching missing pieces from upstream",
                        self.digest[7:19], why)
        self.upstream = range(self.layout.count)
        self.sched.set_upstream_range(0, self.layout.count)

    async def _from_peer(self, peer_id: str, index: int) -> None:
        now = trio.current_time()
        expected = self.state.hashes[index]
        try:
            with trio.fail_after(PIECE_TIMEOUT):
                link = await self.swarm._link(self.addrs[peer_id])
                answer = await link.call(lambda rid: Request(rid, self.digest, self.size,
                                                             index))
        except (PeerUnavailable, trio.TooSlowError) as exc:
            log.info("blob %s: peer %s unavailable: %s", self.digest[7:19], peer_id, exc)
            now = trio.current_time()
            self.swarm.membership.failed(self.addrs[peer_id], now)
            self.sched.peer_gone(peer_id, now)
            self.gone[peer_id] = now + GONE_RETRY
            self._poke()
            return
        now = trio.current_time()
        data = answer.data if isinstance(answer, Piece) else None
        busy = isinstance(answer, Refuse) and answer.reason == REFUSE_BUSY
        if busy:  # it holds the piece: ask others, and it nothing for a moment
            self.sched.busy(peer_id, index, now)
        elif data is None or expected is None:
            self.refused.setdefault(peer_id, {})[index] = now + MISSING_RETRY
            self.sched.refused(peer_id, index, now)
        elif not await self.store(index, data, "peer"):  # checks it against the table
            log.warning("blob %s: piece %d from %s failed its hash; blamed", self.digest[7:19],
                        index, peer_id)
            self.swarm._on_blame()
            self.sched.piece_received(peer_id, index, False, now)
        else:
            self.swarm._on_peer_bytes(len(data))
            self.sched.piece_received(peer_id, index, True, now)
            self._held(index)
        self._poke()

    async def _from_upstream(self, indices: tuple[int, ...]) -> None:
        runs: list[list[int]] = []
        for i in indices:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            await self._upstream_run(run)

    async def _upstream_run(self, run: list[int]) -> None:
        done: set[int] = set()

        async def got(index: int, data: bytes) -> None:
            await self.store(index, data, "upstream")
            done.add(index)
            self.sched.upstream_received(index, trio.current_time())
            self._held(index)
            self._poke()

        try:
            await self.fetch_range(run[0], run[-1] + 1, got)
        except (P2PError, OSError) as exc:
            log.info("blob %s: upstream pieces %d-%d failed: %s", self.digest[7:19],
                     run[0], run[-1], exc)
            for i in run:
                if i not in done:
                    self.sched.upstream_failed(i, trio.current_time())
            self._poke()

    def _held(self, index: int) -> None:
        self.last_progress = trio.current_time()
        if index == self.layout.count - 1 and not self.sched.done:
            # Served only once the whole blob has matched its digest (blobs.py holds
            # the last piece back): announced when the download ends, not before.
            return
        self.state.held.add(index)
        self.announce_due = True

    async def _announcer(self) -> None:
        while True:
            # No more often than the coordinator answers lookups: one that takes a second
            # to answer has a second's worth of messages queued; announcing every
            # ANNOUNCE_DELAY would only lengthen its queue. But a fetcher's at once: they
            # bring the swarm its first copies and keep its lease alive, and few fetch.
            await trio.sleep(ANNOUNCE_DELAY if self.sched.fetching_upstream
                             else max(ANNOUNCE_DELAY, self.lookup_time))
            if self.announce_due and not self.solo:
                self.announce_due = False
                await self.swarm.announce(self.state)


def _count(size: int) -> int:
    return PieceLayout.for_size(size).count
