"""The operator commands' pure parts: image references, credentials, containerd config
reading, hosts.toml checks, the activity books and the status text."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from p2pd.client.doctor import check_daemon, check_hosts, read_containerd_config
from p2pd.client.oci import ClientError, credentials
from p2pd.client.status import render
from p2pd.core.activity import Activity, ManifestSeen, Served
from p2pd.core.names import parse_reference
from p2pd.errors import InvalidRequest
from p2pd.hosts import write_hosts_toml

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "name", "reference"), [
    ("alpine", "docker.io", "library/alpine", "latest"),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20"),
    ("team/app", "docker.io", "team/app", "latest"),
    ("localhost/app", "localhost", "app", "latest"),
    ("127.0.0.1:5000/lab/small:v1", "127.0.0.1:5000", "lab/small", "v1"),
    (f"ghcr.io/a/b:1@{D}", "ghcr.io", "a/b", D),
    (f"ghcr.io/a/b@{D}", "ghcr.io", "a/b", D),
    ("[::1]:5000/x:y", "[::1]:5000", "x", "y"),
])
def test_references_parse_as_docker_and_containerd_read_them(
    text: str, registry: str, name: str, reference: str,
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.name, ref.reference) == (registry, name, reference)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("text", ["UPPER/x", "a:b:c", "x@sha256:12", "x:-bad", "",
                                  "reg.io/", "x@md5:" + "0" * 32])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_reference(text)


def test_credentials_come_from_a_docker_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    token = base64.b64encode(b"user:pa:ss").decode()
    path.write_text(json.dumps({"auths": {
        "reg.example:5000": {"auth": token},
        "https://index.docker.io/v1/": {"username": "hub", "password": "secret"},
    }}))
    assert credentials(path, "reg.example:5000") == ("user", "pa:ss")
    assert credentials(path, "docker.io") == ("hub", "secret")
    assert credentials(path, "other.example") is None
    assert credentials(None, "reg.example:5000") is None
    path.write_text("{not json")
    with pytest.raises(ClientError, match="cannot read auth file"):
        credentials(path, "reg.example:5000")


def test_containerd_config_is_read_for_the_cri_hosts_directory(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                      '  config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n')
    wiring = read_containerd_config(config)
    assert wiring.config_path == [Path("/etc/containerd/certs.d"), Path("/etc/docker/certs.d")]
    assert wiring.problems == []
    config.write_text('version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
                      '  config_path = "/etc/containerd/certs.d"\n')
    assert read_containerd_config(config).config_path == [Path("/etc/containerd/certs.d")]
    config.write_text(
        'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://mirror.example"]\n')
    problems = " ".join(read_containerd_config(config).problems)
    assert "CRI plugin is disabled" in problems and "registry.mirrors is set" in problems
    config.write_text("version = [")
    assert "cannot read" in read_containerd_config(config).problems[0]
    assert read_containerd_config(tmp_path / "missing.toml").problems


def test_hosts_toml_checks_name_the_problem(tmp_path: Path) -> None:
    write_hosts_toml(tmp_path, "reg.example", "http://127.0.0.1:5001")
    write_hosts_toml(tmp_path, "_default", "http://127.0.0.1:5001")
    (tmp_path / "elsewhere.example").mkdir()
    (tmp_path / "elsewhere.example" / "hosts.toml").write_text(
        'server = "https://elsewhere.example"\n[host."http://127.0.0.1:6000"]\n')
    (tmp_path / "pushonly.example").mkdir()
    (tmp_path / "pushonly.example" / "hosts.toml").write_text(
        '[host."http://localhost:5001"]\n  capabilities = ["push"]\n')
    checks = {c.name.removeprefix("hosts.toml for "): c for c in check_hosts(
        [tmp_path], ["reg.example", "other.example", "elsewhere.example",
                     "pushonly.example"], "127.0.0.1:5001")}
    assert checks["reg.example"].ok is True
    assert checks["other.example"].ok is True  # _default covers it
    assert checks["other.example"].found.startswith(str(tmp_path / "_default"))
    assert checks["elsewhere.example"].ok is False
    assert "names no host at 127.0.0.1:5001" in checks["elsewhere.example"].found
    assert checks["pushonly.example"].ok is False
    assert "capabilities" in checks["pushonly.example"].found
    empty = check_hosts([tmp_path / "none"], ["reg.example"], "0.0.0.0:5001")
    assert empty[0].ok is False and "p2pd containerd-config" in empty[0].fix


def status_doc(activity: Activity) -> dict[str, object]:
    return {
        "version": "0", "node_id": "n1", "mirror": "127.0.0.1:5001",
        "peer_addr": "10.0.0.1:5002", "uptime_seconds": 3725.0,
        "registries": {}, "default_registry": "docker.io",
        "cache": {"dir": "/c", "limit_bytes": 1 << 30, "used_bytes": 3 << 20, "blobs": 2,
                  "writable": False, "error": "read-only file system",
                  "largest": [{"digest": D, "size": 2 << 20}, {"digest": D, "size": 1 << 20}]},
        "downloads": [{"digest": D, "size": 1 << 20, "peers": 512, "upstream": 0,
                       "seconds": 1.5}],
        "members": [{"addr": "10.0.0.1:5002", "state": "alive", "self": True},
                    {"addr": "10.0.0.2:5002", "state": "alive", "self": False},
                    {"addr": "10.0.0.3:5002", "state": "down", "self": False}],
        **activity.to_json(),
    }


def test_activity_counts_sources_and_the_egress_saved() -> None:
    activity = Activity()
    activity.blob(Served(100.0, "reg", "a/b", D, 1000, 1000, 0, 900, 100))
    activity.blob(Served(101.0, "reg", "a/b", D, 1000, 1000, 1000, 0, 0))
    activity.manifest(ManifestSeen(99.0, "reg", "a/b", "v1", "GET", 200))
    doc = activity.to_json()
    assert doc["totals"] == {"responses": 2, "sent": 2000, "cache": 1000, "peers": 900,
                             "upstream": 100, "egress_saved": 1900}
    recent = doc["recent"]
    assert isinstance(recent, list) and [r["at"] for r in recent] == [101.0, 100.0]
    assert recent[1]["egress_saved"] == 900
    for i in range(300):  # bounded
        activity.blob(Served(float(i), "reg", "a/b", D, 1, 1, 1, 0, 0))
    assert len(activity.served) == 100 and activity.totals.responses == 302

    text = render(status_doc(activity), now=200.0)
    assert "up 1h02m" in text and "NOT WRITABLE: read-only file system" in text
    assert "2 others: 1 alive, 0 suspect, 1 down" in text
    assert "registry egress saved" in text and "reg/a/b" in text

    checks = {c.name: c for c in check_daemon(status_doc(activity))}
    assert checks["cache"].ok is False and "uid 10001" in checks["cache"].fix
    assert checks["peers"].ok is False and "10.0.0.3:5002" in checks["peers"].found
