"""A private ``containerd`` instance (own root, state and socket) driven through ``ctr``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from p2pd.lab.procs import Proc, StopOnExit

log = logging.getLogger(__name__)

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
NAMESPACE = "default"

# The unix socket path limit is 108 bytes; keep well below it.
_MAX_SOCK_PATH = 100

# Plugins that are useless for pulling and either need a kubelet (cri) or log
# errors on every start in a sandbox (btrfs/zfs/aufs/devmapper need special
# filesystems or kernel modules).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
)

DEFAULT_SNAPSHOTTER = "overlayfs"


class CtrError(RuntimeError):
    """A ``ctr`` command failed; carries the command, exit status and output."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        """Record the failed command and its output."""
        self.cmd = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(args)} exited {returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )


def _toml_str(value: str) -> str:
    # JSON string escaping is valid for TOML basic strings.
    return json.dumps(value)


def containerd_config(
    root: Path, state: Path, sock: Path, opt_dir: Path, *, debug: bool = False,
    cri_hosts_dir: Path | None = None,
) -> str:
    """Render a containerd v2 config for an isolated instance.

    With ``cri_hosts_dir`` the CRI plugin (the kubelet's way in) is left enabled and
    reads its registry hosts from that directory, as on a Kubernetes node.
    """
    plugins = [p for p in DISABLED_PLUGINS
               if cri_hosts_dir is None or p != "io.containerd.grpc.v1.cri"]
    disabled = ", ".join(_toml_str(p) for p in plugins)
    cri = [] if cri_hosts_dir is None else [
        '[plugins."io.containerd.grpc.v1.cri"]',
        f"  root = {_toml_str(str(root / 'cri'))}",
        f"  state = {_toml_str(str(state / 'cri'))}",
        '[plugins."io.containerd.grpc.v1.cri".registry]',
        f"  config_path = {_toml_str(str(cri_hosts_dir))}",
        "",
    ]
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml_str(str(root))}",
            f"state = {_toml_str(str(state))}",
            f"disabled_plugins = [{disabled}]",
            "",
            "[grpc]",
            f"  address = {_toml_str(str(sock))}",
            "",
            "[ttrpc]",
            f"  address = {_toml_str(str(sock) + '.ttrpc')}",
            "",
            "[debug]",
            '  address = ""',
            f'  level = "{"debug" if debug else "info"}"',
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(str(opt_dir))}",
            "",
            *cri,
        ]
    )


class Containerd(StopOnExit):
    """A running containerd with its own root/state dirs and gRPC socket.

    Create with :meth:`Containerd.start`; use as a context manager or call :meth:`stop`.
    All ``ctr`` calls use :attr:`namespace` (default ``default``) and :attr:`snapshotter`.
    """

    def __init__(
        self,
        workdir: Path,
        sock: Path,
        proc: Proc,
        snapshotter: str,
        sock_dir: Path | None,
        namespace: str = NAMESPACE,
    ):
        """Wrap an already started containerd; prefer :meth:`start`."""
        self.workdir = workdir
        self.sock = sock
        self.proc = proc
        self.snapshotter = snapshotter
        self.namespace = namespace
        self._sock_dir = sock_dir

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        namespace: str = NAMESPACE,
        debug: bool = False,
        timeout: float = 20.0,
        cri_hosts_dir: Path | None = None,
    ) -> Containerd:
        """Write a config into ``workdir``, start containerd and wait until it answers.

        ``cri_hosts_dir`` enables the CRI plugin with that registry ``config_path``.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        sock = workdir / "c.sock"
        sock_dir: Path | None = None
        if len(str(sock)) + len(".ttrpc") > _MAX_SOCK_PATH:
            sock_dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
            sock = sock_dir / "c.sock"
        config = workdir / "config.toml"
        config.write_text(
            containerd_config(
                workdir / "root", workdir / "state", sock, workdir / "opt", debug=debug,
                cri_hosts_dir=cri_hosts_dir,
            )
        )
        proc = Proc.start([CONTAINERD_BIN, "--config", str(config)], workdir / "containerd.log")
        self = cls(workdir, sock, proc, snapshotter, sock_dir, namespace)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("containerd up at %s (snapshotter %s)", sock, snapshotter)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if not self.proc.alive:
                raise RuntimeError(
                    f"containerd exited ({self.proc.returncode}); log tail:\n{self.proc.log_tail()}"
                )
            if self.sock.exists():
                res = self.ctr("version", timeout=5, check=False)
                if res.returncode == 0:
                    return
                last = res.stderr.strip()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"containerd at {self.sock} not ready after {timeout:.1f}s: {last}\n"
                    f"log tail:\n{self.proc.log_tail()}"
                )
            time.sleep(0.05)

    def ctr_args(self, *args: str) -> list[str]:
        """The full ``ctr`` argv for ``args`` against this instance."""
        return [CTR_BIN, "--address", str(self.sock), "--namespace", self.namespace, *args]

    def ctr(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCK -n NS <args>``; raise :class:`CtrError` on failure if ``check``."""
        argv = self.ctr_args(*args)
        log.debug("running %s", " ".join(argv))
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise CtrError(argv, res.returncode, res.stdout, res.stderr)
        return res

    def ctr_popen(self, *args: str, log_path: Path, env: Mapping[str, str] | None = None) -> Proc:
        """Start ``ctr <args>`` in the background (e.g. a pull to be killed mid-way)."""
        return Proc.start(self.ctr_args(*args), log_path, env=env)

    def pull_args(
        self,
        ref: str,
        *,
        hosts_dir: Path,
        user: str | None = None,
        plain_http: bool = True,
        extra: tuple[str, ...] = (),
    ) -> list[str]:
        """Arguments (after ``ctr``) for ``images pull`` that also unpacks the image."""
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        if user is not None:
            args += ["--user", user]
        args += ["--snapshotter", self.snapshotter, *extra, ref]
        return args

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: Path,
        user: str | None = None,
        plain_http: bool = True,
        timeout: float = 300,
        check: bool = True,
        extra: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` ``ref`` through the hosts.toml files in ``hosts_dir``.

        ``user`` is ``"USER:PASSWORD"``. The image is unpacked into :attr:`snapshotter`.
        """
        args = self.pull_args(
            ref, hosts_dir=hosts_dir, user=user, plain_http=plain_http, extra=extra
        )
        return self.ctr(*args, timeout=timeout, check=check)

    def pull_popen(
        self,
        ref: str,
        *,
        hosts_dir: Path,
        log_path: Path,
        user: str | None = None,
        plain_http: bool = True,
    ) -> Proc:
        """Start a pull in the background (see :meth:`pull`)."""
        args = self.pull_args(ref, hosts_dir=hosts_dir, user=user, plain_http=plain_http)
        return self.ctr_popen(*args, log_path=log_path)

    def image_refs(self) -> set[str]:
        """Names of all images in the namespace."""
        out = self.ctr("images", "ls", "-q").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def content_digests(self) -> set[str]:
        """Digests of all content blobs in the content store."""
        out = self.ctr("content", "ls", "-q").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def snapshot_keys(self) -> list[tuple[str, str]]:
        """``(key, parent)`` of every snapshot in :attr:`snapshotter`."""
        out = self.ctr("snapshots", "--snapshotter", self.snapshotter, "ls").stdout
        result = []
        for line in out.splitlines()[1:]:
            parts = line.split()
            if not parts:
                continue
            key = parts[0]
            parent = parts[1] if len(parts) >= 3 else ""
            result.append((key, parent))
        return result

    def lease_ids(self) -> set[str]:
        """IDs of all leases."""
        out = self.ctr("leases", "ls", "-q").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    @property
    def content_root(self) -> Path:
        """The content store directory of this instance."""
        return self.workdir / "root" / "io.containerd.content.v1.content"

    def active_ingests(self) -> set[str]:
        """Refs of unfinished downloads (``ctr content active``), e.g. after a killed pull."""
        out = self.ctr("content", "active").stdout
        return {line.split()[0] for line in out.splitlines()[1:] if line.strip()}

    def discard_ingests(self) -> None:
        """Delete partially downloaded blobs so the next pull cannot resume them.

        Only call this while no pull is running against this instance.
        """
        ingest = self.content_root / "ingest"
        if ingest.is_dir():
            for child in ingest.iterdir():
                shutil.rmtree(child, ignore_errors=True)

    def remove_image(self, ref: str | None = None) -> None:
        """Remove ``ref`` (or every image if None) and all content, snapshots and leases.

        Partial downloads left by interrupted pulls are discarded too, so afterwards a
        pull must fetch every blob again. Do not call while a pull is running.
        """
        refs = [ref] if ref is not None else sorted(self.image_refs())
        for name in refs:
            self.ctr("images", "rm", "--sync", name, check=False)
        for lease in self.lease_ids():
            self.ctr("leases", "rm", "--sync", lease, check=False)
        digests = sorted(self.content_digests())
        if digests:
            self.ctr("content", "rm", *digests, check=False)
        self._remove_snapshots()
        self.discard_ingests()
        left = self.content_digests()
        if left:
            raise RuntimeError(f"content still present after remove_image: {sorted(left)}")

    def _remove_snapshots(self) -> None:
        for _ in range(100):
            snaps = self.snapshot_keys()
            if not snaps:
                return
            parents = {parent for _, parent in snaps if parent}
            leaves = [key for key, _ in snaps if key not in parents]
            for key in leaves:
                self.ctr("snapshots", "--snapshotter", self.snapshotter, "rm", key, check=False)
        raise RuntimeError(f"could not remove snapshots: {self.snapshot_keys()}")

    def stop(self) -> None:
        """Stop containerd and remove the out-of-tree socket dir, if any."""
        self.proc.stop()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<Containerd {self.sock} snapshotter={self.snapshotter}>"
