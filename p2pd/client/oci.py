"""Talking to a p2pd daemon as containerd does: the OCI pull API of its mirror port (with
``?ns=REGISTRY``), the registry's own token flow, and the daemon's ``/_p2pd/`` endpoints.

Credentials come from a docker ``config.json`` (``auths`` with ``auth`` = base64 of
``user:password``, or ``username``/``password``); they go only to the daemon, which
relays them to the registry, and to the registry's token service.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from p2pd.core.digest import Digest
from p2pd.core.names import DOCKER_HUB, ImageReference
from p2pd.errors import P2PError

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
MAX_MANIFEST = 4 << 20
CHUNK = 1 << 20
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class ClientError(P2PError):
    """A command could not do its work (the message says what and why)."""


def auth_file(explicit: Path | None) -> Path | None:
    """The docker ``config.json`` to read: ``explicit`` (``-`` for standard input),
    ``$REGISTRY_AUTH_FILE``, ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``,
    the first that exists."""
    if explicit == Path("-"):
        return explicit
    if explicit is not None:
        if not explicit.is_file():
            raise ClientError(f"auth file {explicit} does not exist")
        return explicit
    candidates = [os.environ.get("REGISTRY_AUTH_FILE")]
    if os.environ.get("DOCKER_CONFIG"):
        candidates.append(str(Path(os.environ["DOCKER_CONFIG"]) / "config.json"))
    candidates.append(str(Path.home() / ".docker" / "config.json"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def credentials(path: Path | None, registry: str) -> tuple[str, str] | None:
    """``(user, password)`` for ``registry`` from a docker ``config.json``, if it has them."""
    if path is None:
        return None
    try:
        doc = json.loads(sys.stdin.read() if path == Path("-") else path.read_text())
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read auth file {path}: {exc}") from exc
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError as exc:
                raise ClientError(f"auth file {path}: bad auth for {key}") from exc
            return user, password
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


def goarch() -> str:
    """This machine's architecture in OCI terms."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def from_json(cls, doc: Any) -> Descriptor:
        """A descriptor from a manifest's JSON, checked."""
        if not isinstance(doc, dict) or not isinstance(doc.get("size"), int) \
                or not isinstance(doc.get("digest"), str) or doc["size"] < 0:
            raise ClientError(f"malformed descriptor in manifest: {str(doc)[:200]}")
        Digest.parse(doc["digest"])
        return cls(str(doc.get("mediaType", "")), doc["digest"], doc["size"])


@dataclass(frozen=True, slots=True)
class Image:
    """A resolved image: its manifest (for this platform) and the blobs it names."""

    ref: ImageReference
    manifest: Descriptor
    manifest_bytes: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """The config and every layer."""
        return (self.config, *self.layers)


class Mirror:
    """A client of one daemon's mirror port for one registry (thread-safe for blobs)."""

    def __init__(self, url: str, ref: ImageReference, auth: tuple[str, str] | None,
                 timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.ref = ref
        self._auth = auth
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
        self._authorization: str | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the daemon's own endpoints -------------------------------------------------

    def admin(self, method: str, path: str, timeout: float | None = 10.0,
              **params: object) -> dict[str, Any]:
        """Ask the daemon's ``/_p2pd/`` endpoint; its JSON answer."""
        url = f"{self.url}/_p2pd/{path}"
        if params:
            url += "?" + urlencode(params)
        try:
            resp = self._http.request(method, url, timeout=timeout)
        except httpx.HTTPError as exc:
            raise ClientError(f"p2pd at {self.url} did not answer: {exc}") from exc
        try:
            doc = resp.json()
        except ValueError as exc:
            raise ClientError(f"p2pd at {self.url} answered {resp.status_code} without "
                              "JSON: is this a p2pd mirror port?") from exc
        if resp.status_code >= 400 and resp.status_code != 502:
            raise ClientError(f"p2pd {path}: {_oci_message(doc) or resp.status_code}")
        return doc  # type: ignore[no-any-return]

    # -- the pull API ---------------------------------------------------------------

    def _target(self, kind: str, reference: str) -> str:
        return f"{self.url}/v2/{self.ref.name}/{kind}/{reference}?ns={self.ref.registry}"

    @contextmanager
    def _get(self, kind: str, reference: str, accept: str | None = None
             ) -> Iterator[httpx.Response]:
        """GET through the mirror, doing the registry's auth dance once if it asks."""
        for attempt in range(2):
            headers = {"Accept": accept} if accept else {}
            if self._authorization:
                headers["Authorization"] = self._authorization
            try:
                with self._http.stream("GET", self._target(kind, reference),
                                       headers=headers) as resp:
                    if resp.status_code == 401 and attempt == 0:
                        challenge = resp.headers.get("www-authenticate", "")
                        resp.read()
                    else:
                        if resp.status_code != 200:
                            body = resp.read()
                            raise ClientError(
                                f"{kind[:-1]} {reference} of {self.ref.registry}/"
                                f"{self.ref.name}: the mirror answered {resp.status_code} "
                                f"{_oci_message(_json(body))}".rstrip())
                        yield resp
                        return
            except httpx.HTTPError as exc:
                raise ClientError(f"p2pd at {self.url}: {exc}") from exc
            with self._lock:
                self._authorization = self._authorize(challenge)
        raise AssertionError("unreachable")

    def _authorize(self, challenge: str) -> str:
        scheme, _, rest = challenge.partition(" ")
        if self._auth is None:
            raise ClientError(f"{self.ref.registry} wants credentials for {self.ref.name}: "
                              "give --auth-file (docker config.json format)")
        basic = "Basic " + base64.b64encode(":".join(self._auth).encode()).decode()
        if scheme.lower() == "basic":
            return basic
        if scheme.lower() != "bearer":
            raise ClientError(f"{self.ref.registry} asks for unknown auth scheme {scheme!r}")
        params = dict(_CHALLENGE.findall(rest))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise ClientError(f"{self.ref.registry}: bad token realm {realm!r}")
        try:
            resp = self._http.get(realm, params=params, headers={"Authorization": basic})
        except httpx.HTTPError as exc:
            raise ClientError(f"token service {realm}: {exc}") from exc
        token = _json(resp.content).get("token") or _json(resp.content).get("access_token")
        if resp.status_code != 200 or not isinstance(token, str):
            raise ClientError(f"token service {realm} answered {resp.status_code}")
        return f"Bearer {token}"

    def manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """A manifest (or index) and its descriptor, the bytes checked against a digest."""
        with self._get("manifests", reference, ACCEPT) as resp:
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST:
                    raise ClientError(f"manifest {reference} is larger than 4 MiB")
            media_type = resp.headers.get("content-type", "").split(";")[0]
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise ClientError(f"manifest {reference} hashes to {digest}")
        return Descriptor(media_type, digest, len(body)), body

    def resolve(self, os_name: str = "linux", arch: str | None = None) -> Image:
        """The image's manifest for ``os_name/arch`` (an index is followed once)."""
        arch = arch or goarch()
        desc, body = self.manifest(self.ref.reference)
        doc = _json(body)
        if desc.media_type in INDEX_TYPES or "manifests" in doc:
            for entry in doc.get("manifests") or []:
                plat = entry.get("platform") or {} if isinstance(entry, dict) else {}
                if plat.get("os") == os_name and plat.get("architecture") == arch:
                    desc, body = self.manifest(Descriptor.from_json(entry).digest)
                    doc = _json(body)
                    break
            else:
                raise ClientError(f"{self.ref} has no manifest for {os_name}/{arch}")
        if "layers" not in doc or "config" not in doc:
            raise ClientError(f"{self.ref}: manifest {desc.digest} names no layers")
        return Image(self.ref, desc, body, Descriptor.from_json(doc["config"]),
                     tuple(Descriptor.from_json(layer) for layer in doc["layers"]))

    def blob(self, desc: Descriptor, write: Callable[[bytes], object]) -> None:
        """Stream a blob to ``write``; raises if its bytes do not match its digest."""
        hasher = hashlib.sha256()
        received = 0
        with self._get("blobs", desc.digest) as resp:
            try:
                for chunk in resp.iter_raw(CHUNK):
                    hasher.update(chunk)
                    received += len(chunk)
                    write(chunk)
            except httpx.HTTPError as exc:
                raise ClientError(f"blob {desc.digest[:19]}: transfer broke: {exc}") from exc
        actual = "sha256:" + hasher.hexdigest()
        if received != desc.size or actual != desc.digest:
            raise ClientError(f"blob {desc.digest[:19]}: got {received} bytes hashing to "
                              f"{actual[:19]}, expected {desc.size} bytes")


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _oci_message(doc: dict[str, Any]) -> str:
    errors = doc.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return f"{errors[0].get('code', '')}: {errors[0].get('message', '')}"
    return ""
