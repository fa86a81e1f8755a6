"""The OCI distribution grammar for repository names, tags and registry hosts."""

from __future__ import annotations

import re

from p2pd.errors import NameInvalid, ReferenceInvalid, RegistryInvalid

# From the OCI distribution spec: path components separated by "/".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_HOST_LABEL = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
_HOST = re.compile(
    rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)

MAX_NAME_LENGTH = 255
"""Longest repository name accepted (the limit docker and distribution apply)."""

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT_HOST = "registry-1.docker.io"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise :class:`NameInvalid`."""
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise NameInvalid(f"repository name {name[:80]!r} breaks the OCI name grammar")
    return name


def is_tag(reference: str) -> bool:
    """Whether ``reference`` is a syntactically valid tag."""
    return _TAG.fullmatch(reference) is not None


def validate_tag(tag: str) -> str:
    """Return ``tag`` if valid, else raise :class:`ReferenceInvalid`."""
    if not is_tag(tag):
        raise ReferenceInvalid(f"tag {tag[:80]!r} breaks the OCI tag grammar")
    return tag


def validate_registry_host(host: str) -> str:
    """Return ``host`` (``name[:port]``) if it can name a registry, else raise."""
    if len(host) > 255 or not _HOST.fullmatch(host):
        raise RegistryInvalid(f"registry host {host[:80]!r} is malformed")
    _, sep, port = host.rpartition(":")
    if sep and not host.endswith("]") and int(port) > 65535:
        raise RegistryInvalid(f"registry host {host[:80]!r} has an invalid port")
    return host


def default_endpoint(host: str) -> str:
    """The upstream URL for a registry host with no configured endpoint.

    ``docker.io`` is served by ``registry-1.docker.io``; every other host speaks HTTPS
    on its own name.
    """
    if host == DOCKER_HUB:
        host = DOCKER_HUB_ENDPOINT_HOST
    return f"https://{host}"
