"""A peer that sends wrong bytes is caught piece by piece and blamed; the pull succeeds."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.core.auth import Role
from p2pd.core.bitfield import full_bitfield
from p2pd.core.membership import Member, coordinator_for
from p2pd.core.messages import Announce, Piece, Request
from p2pd.core.pieces import PieceLayout
from p2pd.core.protocol import CLOSED, NEED_DATA, PeerConnection
from p2pd.io.peer import open_peer_link
from p2pd.lab.daemon import P2pd
from p2pd.lab.images import build_image, push_image
from p2pd.lab.procs import free_port
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
MiB = 1 << 20


async def serve_lies(listener: trio.SocketListener, served: list[int]) -> None:
    """A peer port that answers every piece request with bytes of the right length."""

    async def one(stream: trio.SocketStream) -> None:
        conn = PeerConnection("liar", role=Role.RESPONDER, secret=None, rng=random.Random(1))
        async with stream:
            await stream.send_all(conn.data_to_send())
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(1 << 20)))
                    continue
                if event is CLOSED:
                    return
                if isinstance(event, Request):
                    length = PieceLayout.for_size(event.size).length(event.index)
                    served.append(event.index)
                    await stream.send_all(conn.send(Piece(
                        event.request_id, event.digest, event.size, event.index,
                        b"\x66" * length)))

    await trio.serve_listeners(one, [listener])


async def test_a_peer_sending_bad_pieces_is_blamed_and_the_pull_succeeds(
    tmp_path: Path, registry: Registry,
) -> None:
    image = build_image(tmp_path / "image", [8 * MiB], seed=21)
    push_image(image, registry.host, "liar/app")
    layer = image.layers[0]
    truth = image.blob_path(layer.digest).read_bytes()
    layout = PieceLayout.for_size(layer.size)
    hashes = b"".join(hashlib.sha256(truth[a:b]).digest()
                      for a, b in map(layout.span, range(layout.count)))
    # Ports such that an honest daemon coordinates the blob.
    while True:
        ports = {name: free_port() for name in ("a", "b", "liar")}
        addrs = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        members = [Member(addr, addr) for addr in addrs.values()]
        if coordinator_for(layer.digest, members).addr != addrs["liar"]:
            break
    liar_listener = (await trio.open_tcp_listeners(ports["liar"], host="127.0.0.1"))[0]
    common = {"registries": {registry.host: registry.url}, "default_registry": registry.host}
    url = f"/v2/liar/app/blobs/{layer.digest}?ns={registry.host}"
    served: list[int] = []
    with P2pd.start(tmp_path / "a", peer_port=ports["a"], node_id="a", extra=[
                "--peers", f"static:{addrs['b']},{addrs['liar']}"], **common) as a, \
            P2pd.start(tmp_path / "b", peer_port=ports["b"], node_id="b", extra=[
                "--peers", f"static:{addrs['a']},{addrs['liar']}"], **common) as b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_lies, liar_listener, served)
            got = await trio.to_thread.run_sync(
                lambda: httpx.get(a.url + url, trust_env=False, timeout=60).content)
            assert got == truth
            # The liar claims the whole blob, with the right hashes, at the coordinator.
            coordinator = coordinator_for(layer.digest, members).addr
            async with open_peer_link(coordinator, "liar", None) as link:
                await link.send(Announce(layer.digest, layer.size, layout.piece_size,
                                         full_bitfield(layout.count), True, addrs["liar"],
                                         full_bitfield(layout.count), hashes))
            got = await trio.to_thread.run_sync(
                lambda: httpx.get(b.url + url, trust_env=False, timeout=60).content)
            nursery.cancel_scope.cancel()
        assert got == truth
        assert served, "the liar was never asked: the test proves nothing"
        blamed = b.metric("p2pd_blamed_pieces_total")
        assert blamed >= 1
        # Blamed once per blob, never asked again for it.
        assert len(served) <= 4  # at most the requests in flight when the first lie landed
        assert b.metric("p2pd_blob_bytes_fetched_total", source="peer") >= 0.9 * layer.size
