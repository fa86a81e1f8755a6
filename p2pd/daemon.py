"""The daemon: one nursery that wires the I/O services to the core."""

from __future__ import annotations

import logging
import random
import signal
import socket
from dataclasses import dataclass

import trio

from p2pd.config import DaemonConfig
from p2pd.core.digest import Digest
from p2pd.core.lru import LruPolicy
from p2pd.core.membership import Member, Membership
from p2pd.errors import ConfigError
from p2pd.io.admin import Admin
from p2pd.io.blobs import BlobService
from p2pd.io.discovery import (
    discovery_from_spec,
    format_addr,
    names_members_by_address,
    node_id_for_addr,
)
from p2pd.io.http import serve_http
from p2pd.io.metrics import Metrics
from p2pd.io.mirror import Mirror
from p2pd.io.peer import PeerService
from p2pd.io.store import DiskStore
from p2pd.io.swarm import Swarm
from p2pd.io.throttle import Throttle
from p2pd.io.upstream import Upstreams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Running:
    """What a started daemon reports: where it listens and its parts, for tests."""

    mirror_address: tuple[str, int]
    mirror: Mirror
    metrics: Metrics
    peer_address: tuple[str, int] | None = None


def _address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    sockname = listeners[0].socket.getsockname()
    return sockname[0], sockname[1]


async def run_daemon(
    config: DaemonConfig,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run p2pd until cancelled."""
    metrics = Metrics()
    upstreams = Upstreams(config, metrics)
    store = DiskStore(config.cache_dir)
    lru: LruPolicy[Digest] = LruPolicy(config.cache_size, high=config.cache_high,
                                       low=config.cache_low)
    host, port = config.mirror_listen
    # Bind first: a busy port should fail the start before anything else happens.
    listeners = await trio.open_tcp_listeners(port, host=host)
    peer_listeners: list[trio.SocketListener] = []
    if config.peer_listen is not None:
        peer_host, peer_port = config.peer_listen
        peer_listeners = await trio.open_tcp_listeners(peer_port, host=peer_host)
    node_id = config.node_id or socket.gethostname()
    try:
        async with trio.open_nursery() as nursery:
            blobs = BlobService(store, upstreams, metrics, lru, nursery)
            await blobs.open()
            mirror = Mirror(config, blobs, upstreams, metrics)
            admin = Admin(config, node_id, mirror, blobs, started=trio.current_time())
            mirror.admin = admin.handle
            if peer_listeners:
                swarm = None
                if config.peers is not None:
                    swarm = await _start_swarm(config, node_id, _address(peer_listeners),
                                               blobs, metrics, nursery)
                    admin.swarm, admin.membership = swarm, swarm.membership
                    admin.peer_addr = swarm.addr
                peers = PeerService(node_id, config.cluster_secret(), blobs.piece_for_peer,
                                    on_bytes_uploaded=metrics.peer_bytes_uploaded.inc,
                                    on_protocol_error=metrics.peer_protocol_errors.inc,
                                    coordinator=swarm, upload=Throttle(config.upload_limit),
                                    max_uploads=config.max_uploads,
                                    replicate=blobs.replicate, holdings=blobs.holdings)
                await nursery.start(peers.serve, peer_listeners)
                log.info("p2pd peer port on %s as node %s", _address(peer_listeners), node_id)
            await nursery.start(serve_http, listeners, mirror.handle)
            address = _address(listeners)
            admin.mirror_addr = format_addr(*address)
            mirror.ready = True
            log.info("p2pd mirror listening on %s:%d, cache %s (limit %d bytes)",
                     address[0], address[1], config.cache_dir, config.cache_size)
            task_status.started(Running(address, mirror, metrics,
                                        _address(peer_listeners) if peer_listeners else None))
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners + peer_listeners:
                await listener.aclose()
            await upstreams.aclose()


async def _start_swarm(
    config: DaemonConfig, node_id: str, peer_address: tuple[str, int], blobs: BlobService,
    metrics: Metrics, nursery: trio.Nursery,
) -> Swarm:
    assert config.peers is not None
    host, port = peer_address
    addr = config.advertise or format_addr(host, port)
    if host in ("0.0.0.0", "::") and config.advertise is None:
        raise ConfigError("--peer-listen on a wildcard address needs --advertise HOST:PORT")
    # Coordinators are chosen by rendezvous hash over members named by their peer
    # address: every daemon knows every address, whatever ids they call themselves.
    membership = Membership(addr, suspect_after=5.0, drop_after=15.0, self_addr=addr)
    discovered: list[Member] = []

    def on_members(members: list[Member]) -> None:
        discovered[:] = [Member(m.addr, m.addr) for m in members]
        membership.update(discovered, trio.current_time())

    by_addr = names_members_by_address(config.peers)
    me = Member(node_id_for_addr(addr) if by_addr else node_id, addr)
    discovery = discovery_from_spec(config.peers, self_member=me)
    await nursery.start(discovery.run, on_members)
    swarm = Swarm(node_id=node_id, addr=addr, secret=config.cluster_secret(),
                  membership=membership, rng=random.SystemRandom(), nursery=nursery,
                  on_peer_bytes=lambda n: None, on_blame=metrics.blamed_peers.inc,
                  on_request=lambda kind: metrics.coordinator_requests.labels(kind).inc(),
                  download=Throttle(config.download_limit))
    blobs.swarm = swarm

    async def announce_cached() -> None:
        for state in blobs.held_states():
            await swarm.announce(state)
        await swarm.reannounce_forever(blobs.held_states)

    async def keep_books() -> None:
        while True:
            now = trio.current_time()
            # Discovery reports changes only; liveness wants to hear of members regularly.
            membership.update(discovered, now)
            swarm.coordinator.expire(now)
            swarm.forget_down(now)
            seen = membership.statistics(now)
            metrics.peers.labels("alive").set(seen.alive - 1 - seen.suspect)
            metrics.peers.labels("suspect").set(seen.suspect)
            metrics.peers.labels("down").set(seen.down)
            books = swarm.coordinator.statistics()
            metrics.coordinated_blobs.set(books.swarms)
            metrics.leases_granted.set(books.leases_granted)
            metrics.lease_takeovers.set(books.takeovers)
            await trio.sleep(2.0)

    nursery.start_soon(announce_cached)
    nursery.start_soon(keep_books)
    log.info("p2pd swarm: peers from %s (%d found so far), advertised as %s", config.peers,
             len(discovered), addr)
    return swarm


async def serve_until_signalled(config: DaemonConfig) -> None:
    """Run the daemon until SIGTERM or SIGINT, then shut it down cleanly."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(run_daemon, config)
            async for signum in signals:
                log.info("p2pd: %s received, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
