"""A real ``docker-registry`` (distribution 2.x) instance on loopback for tests."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
from pathlib import Path

from p2pd.lab.procs import Proc, StopOnExit, free_port, wait_http

log = logging.getLogger(__name__)

REGISTRY_BIN = "docker-registry"
HTPASSWD_BIN = "htpasswd"


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    """Write a bcrypt htpasswd file for ``user`` (``htpasswd -Bbn``) to ``path``."""
    out = subprocess.run(
        [HTPASSWD_BIN, "-Bbn", user, password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path.write_text(out.strip() + "\n")
    return path


def _yaml_str(value: str) -> str:
    # JSON strings are valid YAML double-quoted scalars.
    return json.dumps(value)


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for ``127.0.0.1`` signed by it (openssl).

    Returns ``(ca_cert, cert, key)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "tls.key", directory / "tls.csr", directory / "tls.pem"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
         str(ca), "-days", "2", "-subj", "/CN=p2pd lab CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    return ca, cert, key


def registry_config(
    root: Path, addr: str, htpasswd_file: Path | None = None,
    tls: tuple[Path, Path] | None = None,
) -> str:
    """Render a docker-registry configuration YAML document."""
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: text",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {_yaml_str(str(root))}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {_yaml_str(addr)}",
        "  secret: p2pd-lab-secret",
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
    ]
    if tls is not None:
        lines += [
            "  tls:",
            f"    certificate: {_yaml_str(str(tls[0]))}",
            f"    key: {_yaml_str(str(tls[1]))}",
        ]
    if htpasswd_file is not None:
        lines += [
            "auth:",
            "  htpasswd:",
            "    realm: p2pd-lab",
            f"    path: {_yaml_str(str(htpasswd_file))}",
        ]
    return "\n".join(lines) + "\n"


class Registry(StopOnExit):
    """A running docker-registry serving plain HTTP on ``127.0.0.1``.

    Create with :meth:`Registry.start`; use as a context manager or call :meth:`stop`.
    """

    def __init__(
        self,
        workdir: Path,
        root: Path,
        port: int,
        proc: Proc,
        creds: tuple[str, str] | None,
        ca_file: Path | None = None,
    ):
        """Wrap an already started registry; prefer :meth:`start`."""
        self.ca_file = ca_file
        self.workdir = workdir
        self.root = root
        self.port = port
        self.proc = proc
        self.creds = creds

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        htpasswd: tuple[str, str] | None = None,
        port: int | None = None,
        timeout: float = 20.0,
        tls: bool = False,
    ) -> Registry:
        """Write a config into ``workdir`` and start ``docker-registry serve``.

        ``htpasswd`` is ``(user, password)``; when given the registry requires basic auth.
        ``tls`` serves HTTPS with a certificate from a throwaway CA (``.ca_file``).
        Blocks until ``/v2/`` answers 200 or 401.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        root = workdir / "storage"
        root.mkdir(exist_ok=True)
        port = port if port is not None else free_port()
        addr = f"127.0.0.1:{port}"
        auth_file = None
        if htpasswd is not None:
            auth_file = make_htpasswd(workdir / "htpasswd", *htpasswd)
        ca_file = None
        tls_files = None
        if tls:
            ca_file, cert, key = make_tls(workdir / "tls")
            tls_files = (cert, key)
        config = workdir / "config.yml"
        config.write_text(registry_config(root, addr, auth_file, tls_files))
        proc = Proc.start([REGISTRY_BIN, "serve", str(config)], workdir / "registry.log")
        scheme = "https" if tls else "http"
        try:
            wait_http(f"{scheme}://{addr}/v2/", timeout=timeout, proc=proc,
                      verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file
                      else True)
        except BaseException:
            proc.stop()
            raise
        log.info("docker-registry up at %s (root %s)", addr, root)
        return cls(workdir, root, port, proc, htpasswd, ca_file)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry host as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL, ``http(s)://127.0.0.1:PORT``."""
        return f"{'https' if self.ca_file else 'http'}://{self.host}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps the blob ``digest`` (``sha256:<hex>``) on disk."""
        algo, _, hexdigest = digest.partition(":")
        return (
            self.root
            / "docker"
            / "registry"
            / "v2"
            / "blobs"
            / algo
            / hexdigest[:2]
            / hexdigest
            / "data"
        )

    def stop(self) -> None:
        """Stop the registry process."""
        self.proc.stop()

    def __repr__(self) -> str:
        return f"<Registry {self.url} root={self.root}>"
