"""Process helpers for the lab harness: free ports, HTTP readiness, managed subprocesses."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

log = logging.getLogger(__name__)


def missing_bins(*names: str) -> list[str]:
    """The subset of executable ``names`` that cannot be found on PATH."""
    return [name for name in names if shutil.which(name) is None]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(
    url: str,
    timeout: float = 20.0,
    ok: Collection[int] = (200, 401),
    proc: Proc | None = None,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll ``url`` with GET until it answers with a status in ``ok``.

    If ``proc`` is given and dies while waiting, fail early with its log.
    Raises :class:`TimeoutError` if ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    with httpx.Client(timeout=2.0, trust_env=False, verify=verify) as client:
        while True:
            if proc is not None and not proc.alive:
                raise RuntimeError(
                    f"process {proc.args[0]} exited ({proc.returncode}) while waiting for "
                    f"{url}; log tail:\n{proc.log_tail()}"
                )
            try:
                resp = client.get(url)
                if resp.status_code in ok:
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{url} did not answer with one of {sorted(ok)} within {timeout:.1f}s "
                    f"(last: {last})"
                )
            time.sleep(0.05)


class StopOnExit:
    """Context-manager support for lab components: leaving the block calls ``stop()``."""

    def stop(self) -> object:
        """Stop the component."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Proc(StopOnExit):
    """A subprocess in its own session, with stdout and stderr going to a log file.

    Use :meth:`start` to create one. ``stop`` and ``kill`` signal the whole process
    group, so children the process spawned are terminated as well.
    """

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, log_file: IO[bytes]):
        """Wrap an already started ``popen``; prefer :meth:`start`."""
        self.popen = popen
        self.log_path = log_path
        self._log_file = log_file
        self.args: list[str] = [str(a) for a in popen.args]  # type: ignore[union-attr]

    @classmethod
    def start(
        cls,
        args: Sequence[str | os.PathLike[str]],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``args`` in a new session, appending its output to ``log_path``."""
        argv = [os.fspath(a) for a in args]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        log.debug("started pid %d: %s (log %s)", popen.pid, " ".join(argv), log_path)
        return cls(popen, log_path, log_file)

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running."""
        return self.popen.poll()

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - group leader reaped and pid reused
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM to the process group, then SIGKILL after ``timeout`` seconds.

        Returns the exit status. Safe to call more than once.
        """
        if self.alive:
            log.debug("stopping pid %d (%s)", self.pid, self.args[0])
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.1fs, killing", self.pid, timeout)
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        # Leftover children of an exited leader still belong to the group.
        self._signal_group(signal.SIGKILL)
        self._log_file.close()
        return self.popen.returncode

    def kill(self) -> int | None:
        """Send SIGKILL to the process group and reap the process."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait()
        self._log_file.close()
        return self.popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its status."""
        return self.popen.wait(timeout)

    def log_text(self) -> str:
        """The full log written so far (decoded leniently)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.returncode}"
        return f"<Proc pid={self.pid} {self.args[0]} {state}>"
