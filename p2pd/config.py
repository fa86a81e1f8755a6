"""Configuration: the only module that reads files or the environment.

Every daemon setting is declared once in :data:`RUN_OPTIONS`; from that table come the
``p2pd run`` flags (and their ``--help``), the keys of the TOML file given with
``--config`` and the ``P2PD_*`` environment variables. Precedence, highest first: flag,
environment, file, default.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pd.core.names import default_endpoint, validate_registry_host
from p2pd.core.tuning import MAX_UPLOADS
from p2pd.errors import ConfigError, P2PError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30,
    "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """Parse a byte count with an optional unit: ``10GiB``, ``500MB``, ``1.5G``, ``4096``."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not a size (examples: 10GiB, 500MB, 4096)")
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{text!r} is not a size (examples: 10GiB, 500MB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_rate(text: str | int) -> int:
    """Parse a rate in bytes per second: ``100MB``, ``1.5GiB/s``, ``1Gbit`` (bits ÷ 8)."""
    if isinstance(text, int):
        return text
    value = str(text).strip()
    if value.lower().endswith("/s"):
        value = value[:-2]
    if value.lower().endswith("bit"):
        return parse_size(value[:-3] or "1") // 8
    return parse_size(value)


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not HOST:PORT")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """How to reach one upstream registry.

    ``host`` is the name clients use (``docker.io``, ``127.0.0.1:5000``), ``endpoint``
    the URL p2pd talks to (scheme decides HTTP or HTTPS).
    """

    host: str
    endpoint: str
    ca_file: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything ``p2pd run`` needs."""

    mirror_listen: tuple[str, int] = ("127.0.0.1", 5001)
    cache_dir: Path = Path("/var/lib/p2pd")
    cache_size: int = 20 * (1 << 30)
    cache_high: float = 0.90
    cache_low: float = 0.75
    registries: Mapping[str, RegistryConfig] = field(default_factory=dict)
    default_registry: str = "docker.io"
    upstream_timeout: float = 60.0
    access_ttl: float = 300.0
    log_level: str = "info"
    peer_listen: tuple[str, int] | None = None
    advertise: str | None = None
    node_id: str | None = None
    cluster_secret_file: Path | None = None
    peers: str | None = None
    upload_limit: int | None = None
    download_limit: int | None = None
    upstream_limit: int | None = None
    max_uploads: int = MAX_UPLOADS

    def cluster_secret(self) -> bytes | None:
        """The cluster secret's bytes (surrounding whitespace dropped), or ``None``."""
        if self.cluster_secret_file is None:
            return None
        try:
            secret = self.cluster_secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --cluster-secret-file: {exc}") from exc
        if len(secret) < 16:
            raise ConfigError("the cluster secret must be at least 16 bytes")
        return secret

    def registry(self, host: str) -> RegistryConfig:
        """Settings for ``host``: the configured ones, or HTTPS on the host's own name."""
        found = self.registries.get(host)
        if found is not None:
            return found
        return RegistryConfig(
            host, default_endpoint(host), read_timeout=self.upstream_timeout
        )


@dataclass(frozen=True)
class Option:
    """One setting of ``p2pd run``: flag, file key and environment variable in one place."""

    name: str
    help: str
    parse: Callable[[Any], Any] = str
    repeatable: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return "P2PD_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def _registry_host(text: Any) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"registry host {text!r} is not a string")
    try:
        return validate_registry_host(text)
    except P2PError as exc:
        raise ConfigError(str(exc)) from exc


def _seconds(text: Any, *, zero: bool = False) -> float:
    value = float(text)
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise ConfigError(f"{text!r} is not a {'non-negative' if zero else 'positive'} "
                          "number of seconds")
    return value


def _ttl(text: Any) -> float:
    return _seconds(text, zero=True)


def _fraction(text: Any) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ConfigError(f"{text!r} is not a fraction in (0, 1]")
    return value


def _log_level(text: Any) -> str:
    level = str(text).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log level {text!r} is not debug, info, warning or error")
    return level


def _advertise(text: Any) -> str:
    parse_hostport(str(text))
    return str(text)


def _peers(text: Any) -> str:
    spec = str(text)
    if spec.partition(":")[0].partition("@")[0] not in ("static", "dns", "mdns"):
        raise ConfigError(f"--peers {spec!r}: expected static:HOST:PORT,..., dns:NAME:PORT "
                          "or mdns")
    return spec


def _positive_rate(text: Any) -> int:
    rate = parse_rate(text)
    if rate <= 0:
        raise ConfigError(f"rate {text!r} must be positive")
    return rate


def _positive_int(text: Any) -> int:
    if isinstance(text, bool):
        raise ConfigError(f"{text!r} is not a whole number")
    value = int(text)
    if value <= 0:
        raise ConfigError(f"{text!r} must be at least 1")
    return value


def _node_id(text: Any) -> str:
    value = str(text)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
        raise ConfigError(f"node id {value!r} must be letters, digits, '.', '_' or '-' "
                          "(at most 128)")
    return value


RUN_OPTIONS: tuple[Option, ...] = (
    Option("mirror-listen", "address containerd reaches the mirror on (default 127.0.0.1:5001)",
           parse_hostport, metavar="HOST:PORT"),
    Option("cache-dir", "directory of the piece cache (default /var/lib/p2pd)", Path,
           metavar="DIR"),
    Option("cache-size", "cache size limit, e.g. 20GiB or 500MB (default 20GiB)", parse_size,
           metavar="SIZE"),
    Option("cache-high", "fraction of --cache-size at which eviction starts (default 0.90)",
           _fraction, metavar="FRACTION"),
    Option("cache-low", "fraction of --cache-size eviction brings the cache down to "
           "(default 0.75)", _fraction, metavar="FRACTION"),
    Option("registry", "upstream endpoint of a registry host, e.g. "
           "127.0.0.1:5000=http://127.0.0.1:5000 (repeatable; in the environment "
           "comma-separated). Hosts without one use https://HOST; docker.io uses "
           "https://registry-1.docker.io", str, repeatable=True, metavar="HOST=URL"),
    Option("registry-ca", "extra CA bundle (PEM) trusted for a registry host's TLS "
           "(repeatable)", str, repeatable=True, metavar="HOST=FILE"),
    Option("default-registry", "registry used for requests without containerd's ns= "
           "parameter (default docker.io)", _registry_host, metavar="HOST"),
    Option("upstream-timeout", "seconds to wait for an upstream registry to answer or send "
           "more bytes (default 60)", _seconds, metavar="SECONDS"),
    Option("access-ttl", "seconds a client's upstream-confirmed read access to a repository "
           "is remembered before it is checked again (default 300)", _ttl,
           metavar="SECONDS"),
    Option("log-level", "debug, info, warning or error (default info)", _log_level,
           metavar="LEVEL"),
    Option("peer-listen", "address of the peer port other daemons connect to (default: "
           "no peer port)", parse_hostport, metavar="HOST:PORT"),
    Option("advertise", "HOST:PORT other daemons should use to reach the peer port, where "
           "it differs from --peer-listen", _advertise, metavar="HOST:PORT"),
    Option("node-id", "this daemon's id among its peers (default: the host name)", _node_id,
           metavar="ID"),
    Option("peers", "how to find the other daemons (needs --peer-listen): "
           "static:HOST:PORT,HOST:PORT (their peer ports), dns:NAME:PORT (every A/AAAA "
           "record of a headless Service, re-resolved every 10 s) or mdns (zeroconf on a "
           "flat network; mdns:SERVICE@ADDR,... to pick the service name and interfaces)",
           _peers, metavar="SPEC"),
    Option("upload-limit", "most bytes per second sent to peers, e.g. 100MB or 1Gbit "
           "(default: no limit)", _positive_rate, metavar="RATE"),
    Option("download-limit", "most bytes per second received from peers (default: no "
           "limit)", _positive_rate, metavar="RATE"),
    Option("upstream-limit", "most bytes per second fetched from upstream registries "
           "(default: no limit)", _positive_rate, metavar="RATE"),
    Option("max-uploads", "pieces sent to peers at the same time, at most (default 8); "
           "further requests are refused as busy", _positive_int, metavar="N"),
    Option("cluster-secret-file", "file holding a shared secret (≥ 16 bytes); peers that "
           "cannot prove they know it get nothing", Path, metavar="FILE"),
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``p2pd run`` flags on ``parser`` (values stay unparsed strings)."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file with the same keys as the flags (env: P2PD_CONFIG)")
    for opt in RUN_OPTIONS:
        parser.add_argument(
            opt.flag, dest=opt.dest, metavar=opt.metavar,
            action="append" if opt.repeatable else "store",
            help=f"{opt.help} [env: {opt.env}]",
        )


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        host, sep, rest = value.partition("=")
        if not sep or not host or not rest:
            raise ConfigError(f"{what} {value!r} is not HOST=VALUE")
        out[_registry_host(host)] = rest
    return out


def load_run_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> DaemonConfig:
    """Build the daemon configuration from parsed flags, the environment and the file."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config_file = args.config or (Path(env["P2PD_CONFIG"]) if env.get("P2PD_CONFIG") else None)
    file_registries: dict[str, Any] = {}
    if config_file is not None:
        try:
            doc = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        known = {opt.name for opt in RUN_OPTIONS} | {"registries"}
        unknown = set(doc) - known
        if unknown:
            raise ConfigError(f"unknown keys in {config_file}: {', '.join(sorted(unknown))}")
        file_registries = doc.pop("registries", {})
        if not isinstance(file_registries, dict):
            raise ConfigError(f"registries in {config_file} must be a table of tables")
        raw.update(doc)
    for opt in RUN_OPTIONS:
        if opt.env in env:
            text = env[opt.env]
            raw[opt.name] = (
                [v.strip() for v in text.split(",") if v.strip()] if opt.repeatable else text
            )
        value = getattr(args, opt.dest, None)
        if value is not None:
            raw[opt.name] = value
    return _build(raw, file_registries)


def _build(raw: Mapping[str, Any], file_registries: Mapping[str, Any]) -> DaemonConfig:
    values: dict[str, Any] = {}
    for opt in RUN_OPTIONS:
        if opt.name not in raw or opt.repeatable:
            continue
        try:
            values[opt.dest] = opt.parse(raw[opt.name])
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{opt.name}: {exc}") from exc
    timeout = float(values.get("upstream_timeout", 60.0))
    registries: dict[str, RegistryConfig] = {}
    for host, table in file_registries.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[registries.{host!r}] must be a table")
        _registry_host(host)
        unknown = set(table) - _REGISTRY_KEYS
        if unknown:
            raise ConfigError(f"unknown keys in [registries.{host!r}]: "
                              f"{', '.join(sorted(unknown))}")
        try:
            registries[host] = RegistryConfig(
                host,
                _endpoint(host, str(table.get("endpoint", default_endpoint(host)))),
                Path(table["ca-file"]) if "ca-file" in table else None,
                _seconds(table.get("connect-timeout", 10.0)),
                _seconds(table.get("timeout", timeout)),
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[registries.{host!r}]: {exc}") from exc
    endpoints = _pairs(_as_list(raw.get("registry", [])), "--registry")
    cas = _pairs(_as_list(raw.get("registry-ca", [])), "--registry-ca")
    for host in endpoints.keys() | cas.keys():
        base = registries.get(host) or RegistryConfig(
            host, default_endpoint(host), read_timeout=timeout
        )
        endpoint = _endpoint(host, endpoints.get(host, base.endpoint))
        ca = Path(cas[host]) if host in cas else base.ca_file
        registries[host] = RegistryConfig(
            host, endpoint, ca, base.connect_timeout, base.read_timeout
        )
    config = DaemonConfig(registries=registries, **values)
    if config.cache_size <= 0:
        raise ConfigError("cache-size must be more than 0 bytes")
    if config.cache_low > config.cache_high:
        raise ConfigError("cache-low must not exceed cache-high")
    return config


_REGISTRY_KEYS = frozenset({"endpoint", "ca-file", "timeout", "connect-timeout"})


def _endpoint(host: str, url: str) -> str:
    endpoint = url.rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint {endpoint!r} of {host} must start with http(s)://")
    return endpoint


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise ConfigError(f"{value!r} must be a string or a list of strings")
