"""containerd ``hosts.toml`` files that point a registry at the p2pd mirror.

containerd (with ``config_path`` set to the hosts directory) reads
``<dir>/<registry host>/hosts.toml``: the ``[host."<mirror>"]`` entries are tried first
and ``server`` last, so a failing p2pd never stops a pull. p2pd marks the files it writes
and only ever rewrites or removes those.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from p2pd.core.names import default_endpoint, validate_registry_host
from p2pd.errors import ConfigError, P2PError

MARKER = "# Managed by p2pd containerd-config: p2pd rewrites or removes only files with this line."
DEFAULT = "_default"
# What may go between the quotes of a TOML basic string unescaped, and into a URL.
_URL = re.compile(r"https?://[^\s\"\\\x00-\x1f\x7f]+")


def _url(what: str, url: str) -> str:
    if not _URL.fullmatch(url):
        raise ConfigError(f"{what} URL {url!r} must start with http:// or https:// and "
                          "contain no spaces, quotes or backslashes")
    return url


def _registry(registry: str) -> str:
    if registry == DEFAULT:
        return registry
    try:
        return validate_registry_host(registry)
    except P2PError as exc:
        raise ConfigError(str(exc)) from exc


def render_hosts_toml(registry: str, mirror: str, server: str | None = None) -> str:
    """The text of ``hosts.toml`` for ``registry`` using the mirror at ``mirror``.

    ``_default`` gets no ``server`` unless one is given (containerd then uses each
    registry's own host); other registries fall back to ``server`` or their HTTPS default.
    """
    _url("mirror", mirror)
    if server is not None:
        _url("server", server)
    lines = [MARKER]
    if _registry(registry) != DEFAULT:
        lines.append(f'server = "{server or default_endpoint(registry)}"')
    elif server:
        lines.append(f'server = "{server}"')
    lines += ["", f'[host."{mirror.rstrip("/")}"]', '  capabilities = ["pull", "resolve"]', ""]
    return "\n".join(lines)


def _ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace")
    except FileNotFoundError:
        return True
    except OSError:
        return False


def check_writable(
    hosts_dir: Path, registry: str, mirror: str, *, server: str | None = None,
    force: bool = False,
) -> str:
    """Validate a write of ``hosts_dir/<registry>/hosts.toml``; return the text to write.

    Raises :class:`ConfigError` for bad arguments or a file p2pd did not write.
    """
    text = render_hosts_toml(registry, mirror, server)
    path = hosts_dir / registry / "hosts.toml"
    if path.exists() and not force and not _ours(path):
        raise ConfigError(f"{path} was not written by p2pd; leaving it alone (use --force)")
    return text


def write_hosts_toml(
    hosts_dir: Path, registry: str, mirror: str, *, server: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``hosts_dir/<registry>/hosts.toml`` atomically; refuse to replace a foreign one."""
    text = check_writable(hosts_dir, registry, mirror, server=server, force=force)
    directory = hosts_dir / registry
    path = directory / "hosts.toml"
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hosts.toml.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def remove_hosts_toml(hosts_dir: Path, registry: str) -> Path | None:
    """Remove ``hosts_dir/<registry>/hosts.toml`` if p2pd wrote it; return what was removed."""
    path = hosts_dir / _registry(registry) / "hosts.toml"
    if not path.exists() or not _ours(path):
        return None
    path.unlink()
    try:
        path.parent.rmdir()
    except OSError:
        pass  # other files live there: not ours to remove
    return path
