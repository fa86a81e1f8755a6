"""Talking to upstream registries with httpx.

One ``httpx.AsyncClient`` per registry host, built from its :class:`RegistryConfig`
(endpoint scheme, extra CA file, timeouts). Responses are streamed; the caller closes
them. Transport failures become :class:`UpstreamError`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable

import httpcore
import httpx

from p2pd.config import DaemonConfig, RegistryConfig
from p2pd.errors import UpstreamError
from p2pd.io.metrics import Metrics
from p2pd.io.throttle import Throttle

log = logging.getLogger(__name__)

USER_AGENT = "p2pd/0.1"
# httpcore reads 64 KiB per receive. Blob bodies run to hundreds of MB, and every read
# costs a trip through httpcore's and h11's Python layers, so read 1 MiB at a time.
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20
# Client headers that are passed on upstream; the rest (Host, Range, Connection, ...)
# belong to the client's hop.
FORWARDED = ("authorization", "accept", "user-agent")


def forwardable(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's header lines that go upstream, every ``Accept`` line kept."""
    return [(k, v) for k, v in headers if k in FORWARDED]


class Upstreams:
    """HTTP clients for the upstream registries."""

    def __init__(self, config: DaemonConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._clients: dict[str, tuple[RegistryConfig, httpx.AsyncClient]] = {}
        self.throttle = Throttle(config.upstream_limit)
        """The ``--upstream-limit`` on blob bytes from every registry together."""

    def settings(self, host: str) -> RegistryConfig:
        """The configuration used for registry ``host``."""
        return self._config.registry(host)

    def _client(self, host: str) -> tuple[RegistryConfig, httpx.AsyncClient]:
        found = self._clients.get(host)
        if found is None:
            cfg = self.settings(host)
            verify: ssl.SSLContext | bool = True
            if cfg.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(cfg.ca_file))
            client = httpx.AsyncClient(
                base_url=cfg.endpoint,
                verify=verify,
                timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                follow_redirects=True,
                # Blob bytes must arrive exactly as stored: offsets and digests refer to them.
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            )
            found = self._clients[host] = (cfg, client)
        return found

    async def send(
        self,
        host: str,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        *,
        kind: str,
    ) -> httpx.Response:
        """Send a request upstream and return the streaming response (caller closes it)."""
        cfg, client = self._client(host)
        request = client.build_request(method, path, headers=list(headers))
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._metrics.upstream_requests.labels(kind, "error").inc()
            raise UpstreamError(f"{method} {cfg.endpoint}{path}: {exc!r}") from exc
        self._metrics.upstream_requests.labels(kind, str(response.status_code)).inc()
        return response

    async def aclose(self) -> None:
        """Close every client."""
        for _, client in self._clients.values():
            await client.aclose()
        self._clients.clear()
