"""A peer link whose connection has ended says the peer is unavailable, whatever its reader
has recorded so far."""

import random
import socket
import struct

import pytest
import trio

from p2pd.core.auth import Role
from p2pd.core.messages import Ping
from p2pd.core.protocol import CLOSED, PeerConnection, State
from p2pd.io.peer import PeerLink, PeerUnavailable, open_peer_link


async def test_sending_on_an_ended_connection_is_a_peer_unavailable() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    try:
        conn = PeerConnection("a", role=Role.INITIATOR, secret=None, rng=random.Random(1))
        conn.receive_data(b"")  # the peer's EOF, seen before the link's reader records it
        assert conn.next_event() is CLOSED and conn.state is State.CLOSED
        link = PeerLink(conn, client, "127.0.0.1:1")
        with pytest.raises(PeerUnavailable, match="connection closed"):
            await link.send(Ping(1))
        with pytest.raises(PeerUnavailable, match="connection closed"):
            await link.call(lambda request_id: Ping(request_id))
    finally:
        await client.aclose()
        await server.aclose()
        await listeners[0].aclose()


async def test_a_peer_resetting_the_connection_during_the_handshake_is_unavailable() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def reset_when_hello_arrives() -> None:
        stream = await listeners[0].accept()
        await stream.receive_some(1)  # the asker's HELLO
        # close with SO_LINGER 0: a reset, as when the peer's process is killed
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset_when_hello_arrives)
            with pytest.raises(PeerUnavailable):
                async with open_peer_link(f"127.0.0.1:{port}", "a", None):
                    pass
    finally:
        await listeners[0].aclose()
