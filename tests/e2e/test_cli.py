"""The operator commands against real daemons, the real docker-registry, skopeo and
containerd: ``p2pd pull``, ``preheat``, ``status`` and ``doctor``."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd, start_swarm
from p2pd.lab.images import Image, build_image, push_image
from p2pd.lab.proxy import TcpProxy
from p2pd.lab.registry import Registry
from tests.e2e.conftest import AUTH, require_bins

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def p2pd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pd", *args], capture_output=True,
                          text=True, timeout=300)


def as_json(run: subprocess.CompletedProcess[str]) -> Any:
    assert run.returncode in (0, 1), run.stderr
    return json.loads(run.stdout)


def wire(hosts: Path, registry: Registry, daemon: P2pd) -> Path:
    run = p2pd("containerd-config", "--registry", registry.host, "--mirror", daemon.url,
               "--server", registry.url, "--hosts-dir", str(hosts))
    assert run.returncode == 0, run.stderr
    return hosts


@pytest.fixture
def app(tmp_path: Path, registry: Registry) -> tuple[Image, str]:
    require_bins("skopeo")
    image = build_image(tmp_path / "image", [2 * MiB, 6 * MiB, 12 * MiB], seed=11)
    return image, push_image(image, registry.host, "cli/app", tag="v1")


def test_pull_writes_a_verified_layout_and_status_says_where_bytes_came_from(
    tmp_path: Path, registry: Registry, app: tuple[Image, str],
) -> None:
    image, ref = app
    with start_swarm(tmp_path, registry.url, registry.host, 2) as (first, second):
        out = tmp_path / "out"
        run = p2pd("pull", "--mirror", first.url, ref, "--output", str(out))
        assert run.returncode == 0, run.stderr
        assert "digests verified" in run.stdout and "upstream 20.0 MiB" in run.stdout
        for blob in (image.manifest, *image.blobs):  # byte for byte what was pushed
            written = out / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
            assert written.read_bytes() == image.blob_path(blob.digest).read_bytes()
        inspect = subprocess.run(["skopeo", "inspect", f"oci:{out}:v1"], capture_output=True,
                                 text=True, check=True)
        assert json.loads(inspect.stdout)["Digest"] == image.manifest.digest

        doc = as_json(p2pd("pull", "--mirror", second.url, ref, "--json"))
        assert doc["manifest"] == image.manifest.digest and doc["output"] is None
        assert doc["bytes"] == image.blob_bytes
        assert doc["from"]["peers"] >= 0.95 * image.layer_bytes
        assert doc["from"]["upstream"] <= 0.05 * image.layer_bytes
        again = as_json(p2pd("pull", "--mirror", second.url, ref, "--json"))
        assert again["from"] == {"cache": image.blob_bytes, "peers": 0, "upstream": 0}

        status = as_json(p2pd("status", "--mirror", second.url, "--json"))
        assert status["cache"]["blobs"] == len(image.blobs) and status["cache"]["writable"]
        assert [b["digest"] for b in status["cache"]["largest"]] == \
            [b.digest for b in sorted(image.blobs, key=lambda b: -b.size)]
        assert [m["state"] for m in status["members"] if not m["self"]] == ["alive"]
        assert status["totals"]["sent"] == 2 * image.blob_bytes
        assert status["totals"]["egress_saved"] >= 2 * image.blob_bytes - 0.05 * image.layer_bytes
        assert {r["name"] for r in status["recent"]} == {"cli/app"}
        text = p2pd("status", "--mirror", second.url)
        assert text.returncode == 0 and "1 others: 1 alive" in text.stdout
        assert "registry egress saved" in text.stdout and "cli/app" in text.stdout


def test_pull_of_a_private_image_uses_docker_credentials(
    tmp_path: Path, auth_registry: Registry,
) -> None:
    require_bins("skopeo")
    image = build_image(tmp_path / "image", [1 * MiB, 2 * MiB], seed=12)
    ref = push_image(image, auth_registry.host, "cli/private", creds=AUTH, tag="v1")
    with P2pd.start(tmp_path / "p2pd", registries={auth_registry.host: auth_registry.url}
                    ) as daemon:
        refused = p2pd("pull", "--mirror", daemon.url, ref)
        assert refused.returncode == 2 and "wants credentials" in refused.stderr

        def auth_file(user: str, password: str) -> Path:
            path = tmp_path / f"{user}-{password}.json"
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            path.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
            return path

        wrong = p2pd("pull", "--mirror", daemon.url, ref, "--auth-file",
                     str(auth_file(AUTH[0], "wrong")))
        assert wrong.returncode == 2 and "401" in wrong.stderr
        doc = as_json(p2pd("pull", "--mirror", daemon.url, ref, "--json", "--auth-file",
                           str(auth_file(*AUTH)), "--output", str(tmp_path / "out")))
        assert doc["bytes"] == image.blob_bytes
        assert doc["from"]["upstream"] == image.blob_bytes
        # The credentials on standard input (kubectl exec -i ... --auth-file - < file).
        piped = subprocess.run(
            [sys.executable, "-m", "p2pd", "pull", "--mirror", daemon.url, ref, "--json",
             "--auth-file", "-"], input=auth_file(*AUTH).read_text(), capture_output=True,
            text=True, timeout=120)
        assert json.loads(piped.stdout)["from"]["cache"] == image.blob_bytes, piped.stderr


def test_preheat_puts_each_blob_on_k_nodes_and_a_later_ctr_pull_takes_it_from_peers(
    tmp_path: Path, registry: Registry, containerd: Containerd, app: tuple[Image, str],
) -> None:
    image, ref = app
    replicas = 2
    with TcpProxy.to(registry.host) as proxy, \
            start_swarm(tmp_path, proxy.url, registry.host, 4) as nodes:
        seed = nodes[0]
        doc = as_json(p2pd("preheat", "--mirror", seed.url, ref, "--replicas",
                           str(replicas), "--json"))
        assert doc["failed"] == 0 and doc["manifest"] == image.manifest.digest
        placed: dict[str, set[str]] = {}
        for p in doc["placements"]:
            placed.setdefault(p["node"], set()).add(p["digest"])
        assert sorted(p["digest"] for p in doc["placements"]) == \
            sorted([b.digest for b in image.blobs] * replicas)
        # Every placement node holds its blobs now (the seed holds all of them).
        for node in nodes[1:]:
            status = as_json(p2pd("status", "--mirror", node.url, "--json"))
            assert status["cache"]["blobs"] == len(placed.get(node.peer_addr, ())), status
        assert sum(n.metric("p2pd_replications_total", reason="fetched") for n in nodes) == \
            sum(1 for p in doc["placements"] if p["reason"] == "fetched") > 0
        # One copy left the registry, for the seed; the replicas came from peers.
        assert sum(n.metric("p2pd_blob_bytes_fetched_total", source="upstream")
                   for n in nodes) == image.blob_bytes

        target = min(nodes[1:], key=lambda n: len(placed.get(n.peer_addr, ())))
        held = placed.get(target.peer_addr, set())
        missing = sum(b.size for b in image.layers if b.digest not in held)
        proxy.reset_counts()
        containerd.pull(ref, hosts_dir=wire(tmp_path / "hosts", registry, target))
        assert ref in containerd.image_refs()
        assert target.metric("p2pd_blob_bytes_fetched_total", source="upstream") == 0
        from_peers = target.metric("p2pd_blob_bytes_fetched_total", source="peer")
        assert from_peers >= 0.95 * missing
        assert proxy.downstream_bytes < 64 * 1024  # manifests and access checks only


def test_preheat_and_admin_endpoints_refuse_bad_input(
    tmp_path: Path, registry: Registry, app: tuple[Image, str],
) -> None:
    image, ref = app
    with start_swarm(tmp_path, registry.url, registry.host, 2) as (node, other):
        base = f"{node.url}/_p2pd"
        cases = [
            ("GET", "/placement?digest=sha256:xyz&replicas=1", 400, "sha256"),
            ("GET", f"/placement?digest={image.config.digest}&replicas=0", 400, "replicas"),
            ("POST", f"/replicate?digest={image.config.digest}&size=1&to=10.9.9.9:1", 400,
             "not a member"),
            ("POST", f"/replicate?digest={image.config.digest}&size=-1&to={other.peer_addr}",
             400, "size"),
            ("GET", "/replicate", 405, "not an endpoint"),
            ("GET", "/nothing", 404, "not an endpoint"),
        ]
        for method, path, status, words in cases:
            resp = httpx.request(method, base + path)
            assert resp.status_code == status, (path, resp.text)
            assert words in resp.json()["errors"][0]["message"], (path, resp.text)
        # A replica of a blob nobody holds fails (peers only: never the registry).
        resp = httpx.post(f"{base}/replicate", params={
            "digest": image.config.digest, "size": image.config.size, "to": other.peer_addr},
            timeout=60)
        assert resp.status_code == 200 and resp.json()["reason"] == "failed"
        assert other.metric("p2pd_replications_total", reason="failed") == 1
        assert other.metric("p2pd_blob_bytes_fetched_total", source="upstream") == 0
        assert httpx.get(f"{node.url}/healthz").status_code == 200
        assert p2pd("preheat", "--mirror", node.url, ref, "--replicas", "2").returncode == 0
    with P2pd.start(tmp_path / "alone", registries={registry.host: registry.url}) as alone:
        run = p2pd("preheat", "--mirror", alone.url, ref)
        assert run.returncode == 2 and "no peers" in run.stderr


def _doctor(daemon: P2pd, ctd: Containerd, *extra: str) -> tuple[int, dict[str, Any]]:
    run = p2pd("doctor", "--mirror", daemon.url, "--json", "--containerd-config",
               str(ctd.workdir / "config.toml"), "--containerd-address", str(ctd.sock),
               "--namespace", ctd.namespace, *extra)
    return run.returncode, as_json(run)


def _failed(report: dict[str, Any]) -> dict[str, str]:
    """What failed, by check name (several checks of one name are joined)."""
    failed: dict[str, str] = {}
    for c in report["checks"]:
        if c["ok"] is False:
            failed[c["name"]] = failed.get(c["name"], "") + c["found"] + " | " + c["fix"]
    return failed


def test_doctor_passes_on_a_wired_containerd_and_names_what_is_broken(
    tmp_path: Path, registry: Registry, app: tuple[Image, str],
) -> None:
    require_bins("containerd", "ctr")
    _image, ref = app
    hosts = tmp_path / "certs.d"
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    default_registry=registry.host) as daemon, \
            Containerd.start(tmp_path / "ctd", cri_hosts_dir=hosts) as ctd:
        wire(hosts, registry, daemon)
        code, report = _doctor(daemon, ctd, "--image", ref)
        assert code == 0 and report["ok"], report
        names = {c["name"]: c["ok"] for c in report["checks"]}
        assert names["pull through p2pd"] is True
        assert names[f"hosts.toml for {registry.host}"] is True
        assert names["containerd config"] is True and names["cache"] is True
        # As in a node debug pod (the host at --host-root; here the host is /).
        code, report = _doctor(daemon, ctd, "--image", ref, "--host-root", "/")
        assert code == 0 and report["ok"], report
        human = p2pd("doctor", "--mirror", daemon.url, "--containerd-config",
                     str(ctd.workdir / "config.toml"))
        assert human.returncode == 0 and "p2pd is wired into containerd" in human.stdout

        # hosts.toml sending pulls elsewhere: named, and the proof fails.
        (hosts / registry.host / "hosts.toml").write_text(
            f'server = "{registry.url}"\n\n[host."http://127.0.0.1:9"]\n'
            '  capabilities = ["pull", "resolve"]\n')
        code, report = _doctor(daemon, ctd, "--image", ref)
        failed = _failed(report)
        assert code == 1 and not report["ok"]
        assert "names no host at" in failed[f"hosts.toml for {registry.host}"]
        assert "never reached p2pd" in failed["pull through p2pd"]

        # No hosts.toml at all: the fix is the command that writes it.
        (hosts / registry.host / "hosts.toml").unlink()
        code, report = _doctor(daemon, ctd)
        assert code == 1
        assert "p2pd containerd-config --registry" in \
            _failed(report)[f"hosts.toml for {registry.host}"]

    # A containerd whose CRI plugin is off and reads no hosts directory.
    with P2pd.start(tmp_path / "p2pd2", registries={registry.host: registry.url}) as daemon, \
            Containerd.start(tmp_path / "ctd2") as plain:
        code, report = _doctor(daemon, plain)
        failed = _failed(report)
        assert code == 1
        assert "CRI plugin is disabled" in failed["containerd config"]
        assert "sets no registry config_path" in failed["containerd config"]
    # No daemon at all.
    run = p2pd("doctor", "--mirror", "http://127.0.0.1:9", "--json")
    assert run.returncode == 1 and "did not answer" in json.loads(run.stdout)["checks"][0]["found"]
