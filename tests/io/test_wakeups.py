"""The peer link's reader sleeps through the middle of a large frame (SO_RCVLOWAT)."""

import socket

import trio

from p2pd.core.messages import Error, Ping
from p2pd.core.protocol import encode_frame
from p2pd.io.peer import RCVLOWAT_MAX, RCVLOWAT_MIN, _Wakeups


def _lowat(stream: trio.SocketStream) -> int:
    return int(stream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))


async def test_the_threshold_follows_what_the_frame_still_needs() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    try:
        wakeups = _Wakeups(client)
        assert _lowat(client) == 1
        wakeups.expect(4 << 20)  # the rest of a 4 MiB piece: wake every RCVLOWAT_MAX
        assert _lowat(client) == RCVLOWAT_MAX
        wakeups.expect(RCVLOWAT_MIN + 5)  # the tail of it: all of the tail at once
        assert _lowat(client) == RCVLOWAT_MIN + 5
        wakeups.expect(RCVLOWAT_MIN - 1)  # small: any byte wakes the reader
        assert _lowat(client) == 1
        # With the threshold up, a frame that needs fewer bytes than it must not be
        # waited for: the reader only raises it to what the current frame still lacks.
        frames = encode_frame(Error("bye", "z" * 1000)) + encode_frame(Ping(3))
        await server.send_all(frames)
        wakeups.expect(len(frames))
        assert _lowat(client) == 1  # under RCVLOWAT_MIN
        with trio.fail_after(5):
            got = b""
            while len(got) < len(frames):
                got += await client.receive_some(1 << 20)
        assert got == frames
    finally:
        await client.aclose()
        await server.aclose()
        await listeners[0].aclose()


async def test_a_stream_without_a_socket_is_left_alone() -> None:
    send, receive = trio.testing.memory_stream_pair()
    wakeups = _Wakeups(receive)
    wakeups.expect(4 << 20)  # nothing to set, nothing raised
    await send.aclose()
