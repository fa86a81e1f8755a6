"""Digests, names, tags, registry hosts and request targets."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.digest import Digest
from p2pd.core.names import default_endpoint, validate_name, validate_registry_host
from p2pd.core.oci import error_body, parse_target
from p2pd.errors import DigestInvalid, NameInvalid, NotFound, ReferenceInvalid, RegistryInvalid

HEX = hashlib.sha256(b"x").hexdigest()


@given(st.binary(min_size=32, max_size=32))
def test_digest_round_trips(raw: bytes) -> None:
    digest = Digest.from_bytes(raw)
    assert Digest.parse(str(digest)) == digest
    assert str(digest) == "sha256:" + raw.hex()


@pytest.mark.parametrize(
    "text",
    ["", "sha256", "sha256:", "sha256:" + HEX[:-1], "sha256:" + HEX + "0",
     "sha256:" + HEX.upper(), "md5:" + HEX, "sha512:" + HEX, "SHA256:" + HEX,
     "sha256:" + HEX[:-1] + "g", ":" + HEX, "sha256:" + HEX + "\n"],
)
def test_malformed_digests_are_refused(text: str) -> None:
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


@given(st.text(max_size=100))
def test_digest_parse_never_fails_otherwise(text: str) -> None:
    try:
        Digest.parse(text)
    except DigestInvalid:
        pass


@pytest.mark.parametrize(
    "name", ["a", "library/alpine", "my-org/my_app/x.y", "a__b", "a--b", "0/1/2"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "a/..", "../a", "a/../b", "A", "a//b", "/a", "a/", "a_", "_a", "a.-b",
     "a___b", "a b", "a%2fb", "x" * 256, "a/" * 128 + "a"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        validate_name(name)


@given(st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True))
def test_generated_component_names_are_valid(name: str) -> None:
    if len(name) <= 255:
        assert validate_name(name) == name


@pytest.mark.parametrize(
    "host", ["docker.io", "127.0.0.1:5000", "localhost", "[::1]:5000", "a-b.example.com:443"]
)
def test_valid_registry_hosts(host: str) -> None:
    assert validate_registry_host(host) == host


@pytest.mark.parametrize("host", ["", "a b", "-a.com", "a..b", "x:99999", "x:", "a/b"])
def test_invalid_registry_hosts(host: str) -> None:
    with pytest.raises(RegistryInvalid):
        validate_registry_host(host)


def test_docker_hub_endpoint() -> None:
    assert default_endpoint("docker.io") == "https://registry-1.docker.io"
    assert default_endpoint("ghcr.io") == "https://ghcr.io"


def test_parse_targets() -> None:
    blob = parse_target(f"/v2/library/alpine/blobs/sha256:{HEX}?ns=docker.io")
    assert (blob.kind, blob.registry, blob.name) == ("blob", "docker.io", "library/alpine")
    assert blob.digest == Digest(HEX)
    tag = parse_target("/v2/a/b/manifests/v1.2")
    assert (tag.kind, tag.registry, tag.reference, tag.digest) == ("manifest", None, "v1.2", None)
    by_digest = parse_target(f"/v2/a/manifests/sha256:{HEX}")
    assert by_digest.digest == Digest(HEX)
    assert parse_target("/v2/").kind == "base"
    # A repository may itself contain "blobs" or "manifests" as a path component.
    odd = parse_target(f"/v2/blobs/manifests/blobs/sha256:{HEX}")
    assert (odd.kind, odd.name) == ("blob", "blobs/manifests")


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("/v2/a/blobs/sha256:12", DigestInvalid),
        ("/v2/a/blobs/latest", DigestInvalid),
        ("/v2/../blobs/sha256:" + HEX, NameInvalid),
        ("/v2/a/%2e%2e/blobs/sha256:" + HEX, NameInvalid),
        ("/v2/" + "a" * 300 + "/blobs/sha256:" + HEX, NameInvalid),
        ("/v2/a/manifests/-bad", ReferenceInvalid),
        ("/v2/a/manifests/" + "t" * 129, ReferenceInvalid),
        ("/v2/a/blobs/sha256:" + HEX + "?ns=a%20b", RegistryInvalid),
        ("/v3/a", NotFound),
        ("/v2/a/tags/list", NotFound),
    ],
)
def test_bad_targets(target: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_target(target)


@given(st.text(max_size=300))
def test_parse_target_only_raises_request_errors(text: str) -> None:
    from p2pd.errors import InvalidRequest

    try:
        parse_target("/v2/" + text)
    except InvalidRequest:
        pass


def test_error_body_is_oci_json() -> None:
    doc = json.loads(error_body("NAME_INVALID", "bad"))
    assert doc["errors"][0]["code"] == "NAME_INVALID"
    assert doc["errors"][0]["message"] == "bad"
