"""The OCI distribution grammar for repository names, tags and registry hosts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pd.core.digest import Digest
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


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed image reference: ``registry/name`` and a tag or a digest (or both)."""

    registry: str
    name: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the manifest endpoint for: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.name}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference the way docker and containerd do.

    The first path component is the registry if it contains ``.`` or ``:`` or is
    ``localhost``; otherwise the image is on Docker Hub, where one-component names live
    under ``library/``. No tag and no digest means ``latest``. Raises a
    :class:`~p2pd.errors.InvalidRequest` subclass naming what is wrong.
    """
    rest, _, digest = text.partition("@")
    if digest:
        Digest.parse(digest)
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = validate_registry_host(first), remainder
    else:
        registry, path = DOCKER_HUB, rest
    name, colon, tag = path.rpartition(":")
    if not colon:
        name, tag = path, ""
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    validate_name(name)
    if tag:
        validate_tag(tag)
    return ImageReference(registry, name, tag or (None if digest else "latest"),
                          digest or None)
