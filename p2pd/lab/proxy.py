"""A threaded TCP forwarder that counts bytes and can throttle the download direction."""

from __future__ import annotations

import logging
import socket
import threading
import time

from p2pd.lab.procs import StopOnExit

log = logging.getLogger(__name__)

_BUF = 64 * 1024


class TokenBucket:
    """A thread-safe token bucket shared by all connections of a proxy.

    ``rate`` is in bytes per second; ``None`` means unlimited. The burst is a tenth
    of a second worth of tokens (at least 16 KiB), so throughput tracks the rate
    closely even for short transfers.
    """

    def __init__(self, rate: float | None):
        """Create a bucket with the given rate (bytes/s, None for unlimited)."""
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive or None")
        self._cond = threading.Condition()
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._closed = False

    @property
    def rate(self) -> float | None:
        """Current rate in bytes/s, or None when unlimited."""
        return self._rate

    def _burst(self) -> float:
        assert self._rate is not None
        return max(self._rate * 0.1, 16 * 1024.0)

    def _refill(self) -> None:
        now = time.monotonic()
        if self._rate is not None:
            self._tokens = min(self._tokens + (now - self._stamp) * self._rate, self._burst())
        self._stamp = now

    def set_rate(self, rate: float | None) -> None:
        """Change the rate; waiters re-evaluate immediately."""
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive or None")
        with self._cond:
            self._refill()
            self._rate = rate
            if rate is not None:
                self._tokens = min(self._tokens, self._burst())
            self._cond.notify_all()

    def close(self) -> None:
        """Wake up all waiters; further :meth:`take` calls return 0."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def refund(self, n: int) -> None:
        """Return ``n`` unused tokens taken by :meth:`take`."""
        if n <= 0:
            return
        with self._cond:
            if self._rate is not None:
                self._tokens = min(self._tokens + n, self._burst())
            self._cond.notify_all()

    def take(self, want: int) -> int:
        """Block until tokens are available and take up to ``want`` of them.

        Returns how many bytes may be sent now: ``want`` when unlimited, 0 after
        :meth:`close`.
        """
        with self._cond:
            while True:
                if self._closed:
                    return 0
                if self._rate is None:
                    return want
                self._refill()
                if self._tokens >= 1.0:
                    n = min(want, int(self._tokens))
                    self._tokens -= n
                    return n
                needed = (1.0 - self._tokens) / self._rate
                self._cond.wait(timeout=min(max(needed, 0.001), 0.1))


class _Conn:
    """One proxied connection: client socket, target socket, number of live pumps."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.pumps = 2

    def abort(self) -> None:
        """Shut both sockets down so blocked pumps wake up."""
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Release both file descriptors."""
        self.client.close()
        self.upstream.close()


class TcpProxy(StopOnExit):
    """Forward TCP connections from ``127.0.0.1:<free port>`` to ``target``.

    Counts bytes in both directions and optionally caps the target-to-client
    (download) rate, summed over all connections. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rate: float | None = None,
        listen_host: str = "127.0.0.1",
        port: int = 0,
    ):
        """Start listening immediately and accept connections on a daemon thread."""
        self.target = target
        self._bucket = TokenBucket(rate)
        self._lock = threading.Lock()
        self._downstream = 0
        self._upstream = 0
        self._connections = 0
        self._closed = False
        self._conns: set[_Conn] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.create_server((listen_host, port), backlog=128)
        self.host: str = self._listener.getsockname()[0]
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tcpproxy-accept-{self.port}", daemon=True
        )
        self._acceptor.start()
        log.debug("TcpProxy %s -> %s:%d (rate %s)", self.address, target[0], target[1], rate)

    @classmethod
    def to(cls, address: str, *, rate: float | None = None) -> TcpProxy:
        """Create a proxy to ``"host:port"`` (e.g. ``Registry.host``)."""
        host, _, port = address.rpartition(":")
        return cls((host, int(port)), rate=rate)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` the proxy listens on."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.address}"

    @property
    def downstream_bytes(self) -> int:
        """Bytes forwarded from the target to clients."""
        with self._lock:
            return self._downstream

    @property
    def upstream_bytes(self) -> int:
        """Bytes forwarded from clients to the target."""
        with self._lock:
            return self._upstream

    @property
    def connections(self) -> int:
        """Number of client connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def active_connections(self) -> int:
        """Number of connections currently open."""
        with self._lock:
            return len(self._conns)

    @property
    def rate(self) -> float | None:
        """Current download rate cap in bytes/s (None: unlimited)."""
        return self._bucket.rate

    def set_rate(self, rate: float | None) -> None:
        """Change the download rate cap (bytes/s, None for unlimited) at run time."""
        self._bucket.set_rate(rate)

    def reset_counts(self) -> None:
        """Zero the byte and connection counters."""
        with self._lock:
            self._downstream = 0
            self._upstream = 0
            self._connections = 0

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._connections += 1
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError as exc:
                log.debug("TcpProxy %s: connect to target failed: %s", self.address, exc)
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream)
            with self._lock:
                if self._closed:
                    conn.abort()
                    conn.close()
                    return
                self._conns.add(conn)
                pair = [
                    threading.Thread(target=self._pump, args=(conn, False), daemon=True),
                    threading.Thread(target=self._pump, args=(conn, True), daemon=True),
                ]
                self._threads.update(pair)
                for t in pair:
                    t.start()

    def _pump(self, conn: _Conn, downstream: bool) -> None:
        src, dst = (conn.upstream, conn.client) if downstream else (conn.client, conn.upstream)
        clean = False
        try:
            while True:
                want = self._bucket.take(_BUF) if downstream else _BUF
                if want == 0:
                    break
                data = src.recv(want)
                if downstream and len(data) < want:
                    self._bucket.refund(want - len(data))
                if not data:
                    clean = True
                    break
                dst.sendall(data)
                with self._lock:
                    if downstream:
                        self._downstream += len(data)
                    else:
                        self._upstream += len(data)
        except OSError:
            pass
        finally:
            if clean:
                # Half-close: let the other direction finish (HTTP keeps working).
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    conn.abort()
            else:
                conn.abort()
            with self._lock:
                self._threads.discard(threading.current_thread())
                conn.pumps -= 1
                finished = conn.pumps == 0
                if finished:
                    self._conns.discard(conn)
            if finished:
                conn.close()

    def stop(self) -> None:
        """Same as :meth:`close`."""
        self.close()

    def close(self) -> None:
        """Stop accepting, abort every live connection and wait for the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
            threads = list(self._threads)
        self._bucket.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in conns:
            conn.abort()
        self._acceptor.join(timeout=5)
        for t in threads:
            t.join(timeout=5)
        log.debug("TcpProxy %s closed", self.address)


    def __repr__(self) -> str:
        return f"<TcpProxy {self.address} -> {self.target[0]}:{self.target[1]}>"
