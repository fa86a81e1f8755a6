"""Starting real p2pd daemons as processes, and reading their metrics."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from p2pd.lab.procs import Proc, StopOnExit, free_port, wait_http

log = logging.getLogger(__name__)


class P2pd(StopOnExit):
    """One ``p2pd run`` process with its own cache directory and mirror port."""

    def __init__(self, workdir: Path, port: int, proc: Proc, args: list[str]) -> None:
        self.workdir = workdir
        self.port = port
        self.proc = proc
        self.args = args

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        registries: Mapping[str, str] = {},
        default_registry: str | None = None,
        extra: Sequence[str] = (),
        port: int | None = None,
        cache_dir: Path | None = None,
        timeout: float = 20.0,
        peer_port: int | None = None,
        node_id: str | None = None,
    ) -> P2pd:
        """Start ``python -m p2pd run`` and wait until ``/healthz`` answers 200.

        ``registries`` maps registry hosts to upstream URLs (``--registry HOST=URL``).
        ``peer_port=0`` opens a peer port on a free port (see :attr:`peer_addr`).
        """
        workdir.mkdir(parents=True, exist_ok=True)
        port = port if port is not None else free_port()
        args = [
            sys.executable,
            "-m",
            "p2pd",
            "run",
            "--mirror-listen",
            f"127.0.0.1:{port}",
            "--cache-dir",
            str(cache_dir or workdir / "cache"),
            "--log-level",
            "debug",
        ]
        for host, url in registries.items():
            args += ["--registry", f"{host}={url}"]
        # Never let a lab daemon reach for docker.io: requests without ns= go to a
        # loopback port where nothing listens unless the caller names a registry.
        args += ["--default-registry", default_registry or "127.0.0.1:9"]
        if peer_port is not None:
            args += ["--peer-listen", f"127.0.0.1:{peer_port or free_port()}"]
        if node_id is not None:
            args += ["--node-id", node_id]
        args += list(extra)
        proc = Proc.start(args, workdir / f"p2pd-{port}.log")
        daemon = cls(workdir, port, proc, args)
        try:
            wait_http(f"{daemon.url}/healthz", timeout=timeout, ok=(200,), proc=proc)
        except BaseException:
            proc.stop()
            raise
        return daemon

    @property
    def url(self) -> str:
        """Base URL of the mirror port."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def peer_addr(self) -> str:
        """``127.0.0.1:PORT`` of the peer port (start with ``peer_port=0`` for one)."""
        return self.args[self.args.index("--peer-listen") + 1]

    @property
    def cache_dir(self) -> Path:
        """The daemon's cache directory."""
        return Path(self.args[self.args.index("--cache-dir") + 1])

    def restart(self, timeout: float = 20.0) -> None:
        """Start the same command again (after :meth:`stop` or :meth:`kill`)."""
        self.proc = Proc.start(self.args, self.workdir / f"p2pd-{self.port}.log.{id(self)}")
        wait_http(f"{self.url}/healthz", timeout=timeout, ok=(200,), proc=self.proc)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``, keyed by ``(name, sorted labels)``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 if the series does not exist yet)."""
        key = (name, tuple(sorted(labels.items())))
        return self.metrics().get(key, 0.0)

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.proc.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the daemon (SIGTERM, then SIGKILL)."""
        self.proc.stop()

    def kill(self) -> None:
        """SIGKILL the daemon."""
        self.proc.kill()



@contextlib.contextmanager
def start_swarm(
    workdir: Path, upstream: str, registry_host: str, n: int, *extra: str
) -> Iterator[list[P2pd]]:
    """``n`` daemons on loopback, each knowing the others' peer ports (static discovery).

    Their upstream for ``registry_host`` is ``upstream`` (the registry, or a proxy in
    front of it); node ``i`` is called ``node{i}`` and keeps its state in ``workdir/node{i}``.
    """
    ports = [free_port() for _ in range(n)]
    daemons: list[P2pd] = []
    try:
        for i, port in enumerate(ports):
            others = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
            daemons.append(P2pd.start(
                workdir / f"node{i}", registries={registry_host: upstream},
                default_registry=registry_host, peer_port=port, node_id=f"node{i}",
                extra=["--peers", f"static:{others}", *extra]))
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()
