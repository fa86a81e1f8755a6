"""deploy/ stays in step with the daemon: the DaemonSet with what `p2pd run` accepts, the
Grafana dashboard with the metrics it exports."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from p2pd import __version__
from p2pd.cli import build_parser
from p2pd.config import load_run_config
from p2pd.io.metrics import Metrics
from p2pd.lab.procs import Proc, free_port, wait_http

ROOT = Path(__file__).parents[2]
DAEMONSET = ROOT / "deploy" / "daemonset.yaml"
KUBERNETES = "1.30"  # a version every supported cluster has


def test_the_configmap_config_loads_with_the_container_flags(tmp_path: Path) -> None:
    text = DAEMONSET.read_text()
    block = re.search(r"p2pd\.toml: \|\n((?:    .*\n)+)", text)
    assert block is not None
    config_file = tmp_path / "p2pd.toml"
    config_file.write_text("\n".join(line[4:] for line in block.group(1).splitlines()))
    command = re.search(r'command: \["p2pd", "run", (.*?)\]', text, re.S)
    assert command is not None
    flags = [f.strip().strip('"') for f in command.group(1).replace("\n", " ").split(",")]
    flags = [f.replace("$(POD_IP)", "10.0.0.7").replace("$(NODE_NAME)", "node-7")
             for f in flags]
    flags[flags.index("--config") + 1] = str(config_file)
    config = load_run_config(build_parser().parse_args(["run", *flags]), environ={})
    assert config.mirror_listen == ("127.0.0.1", 5001)
    assert config.peer_listen == ("0.0.0.0", 7000)
    assert config.advertise == "10.0.0.7:7000"
    assert config.peers is not None and config.peers.startswith("dns:")
    assert "containerPort: 5001" in text and "containerPort: 7000" in text
    assert "path: /healthz" in text


def test_the_grafana_dashboard_only_uses_metrics_the_daemon_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for expr in exprs for m in re.findall(r"\bp2pd_[a-z_]+", expr)}
    metrics = Metrics()
    exported = set()
    for family in metrics.registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    assert used and used <= exported, used - exported
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc]


def test_every_object_is_valid_against_the_kubernetes_schema() -> None:
    documents = _documents()
    kinds = [doc["kind"] for doc in documents]
    assert kinds == ["Namespace", "ConfigMap", "ServiceAccount", "Service", "DaemonSet"]
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    broken = copy.deepcopy(documents[-1])
    broken["spec"]["template"]["spec"]["containers"][-1]["readinessProbe"]["httpGet"][
        "pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_daemonset_is_what_an_operator_expects() -> None:
    *_, daemonset = _documents()
    service = next(d for d in _documents() if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == "p2pd"
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"p2pd", "containerd-hosts"}
    p2pd = containers["p2pd"]
    assert p2pd["securityContext"]["runAsNonRoot"] and p2pd["securityContext"][
        "capabilities"]["drop"] == ["ALL"]
    assert p2pd["resources"]["requests"] and p2pd["resources"]["limits"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert p2pd[probe]["httpGet"]["path"] == "/healthz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["hostPath"]["path"] == "/var/lib/p2pd"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # hosts.toml lives as long as the pod: written at start, removed on deletion.
    hosts = containers["containerd-hosts"]
    assert "--hold" in hosts["command"] and "--remove" not in hosts["command"]
    mount = {m["name"]: m["mountPath"] for m in hosts["volumeMounts"]}["certs-d"]
    assert hosts["command"][hosts["command"].index("--hosts-dir") + 1] == mount
    assert volumes["certs-d"]["hostPath"]["path"] == "/etc/containerd/certs.d"
    assert hosts["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_every_container_command_exists_and_parses() -> None:
    *_, daemonset = _documents()
    pod = daemonset["spec"]["template"]["spec"]
    containerfile = (ROOT / "Containerfile").read_text()
    images = set()
    for container in pod["initContainers"] + pod["containers"]:
        images.add(container["image"])
        command = container["command"]
        if command[0] == "p2pd":  # the console script the package installs
            assert shutil.which("p2pd", path=str(Path(sys.executable).parent))
            build_parser().parse_args(command[1:])  # exits 2 on an unknown flag
        else:
            assert command[0] in {"chown"}, command  # coreutils in the base image
    assert "python:3.11-slim" in containerfile
    [image] = images
    assert image.startswith("ghcr.io/p2pd/p2pd:") and image.endswith(f":{__version__}")


def test_the_daemon_starts_with_the_configmap_and_answers_its_probes(tmp_path: Path) -> None:
    text = DAEMONSET.read_text()
    block = re.search(r"p2pd\.toml: \|\n((?:    .*\n)+)", text)
    assert block is not None
    config = "\n".join(line[4:] for line in block.group(1).splitlines())
    *_, daemonset = _documents()
    p2pd = next(c for c in daemonset["spec"]["template"]["spec"]["containers"]
                if c["name"] == "p2pd")
    probe = p2pd["readinessProbe"]["httpGet"]
    assert f'mirror-listen = "{probe["host"]}:{probe["port"]}"' in config
    # The same config on this machine: free ports, a temporary cache, peers by DNS.
    mirror, peer = free_port(), free_port()
    config = config.replace(f'{probe["host"]}:{probe["port"]}', f"127.0.0.1:{mirror}")
    config = config.replace('"0.0.0.0:7000"', f'"127.0.0.1:{peer}"')
    config = config.replace("/var/lib/p2pd", str(tmp_path / "cache"))
    config = re.sub(r'peers = "dns:[^"]*"', f'peers = "dns:localhost:{peer}"', config)
    (tmp_path / "p2pd.toml").write_text(config)
    flags = [f.replace("$(POD_IP)", "127.0.0.1").replace("$(NODE_NAME)", "node-7")
             .replace(":7000", f":{peer}").replace("/etc/p2pd/p2pd.toml",
                                                   str(tmp_path / "p2pd.toml"))
             for f in p2pd["command"][1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PD_")}
    proc = Proc.start([sys.executable, "-m", "p2pd", *flags], tmp_path / "p2pd.log", env=env)
    try:
        url = f"http://127.0.0.1:{mirror}"
        for kind in ("readinessProbe", "livenessProbe"):
            wait_http(url + p2pd[kind]["httpGet"]["path"], timeout=20, ok=(200,), proc=proc)
        assert "p2pd_cache_bytes" in httpx.get(url + "/metrics").text
        status = httpx.get(url + "/_p2pd/status").json()
        assert status["node_id"] == "node-7" and status["peer_addr"] == f"127.0.0.1:{peer}"
        assert status["cache"]["writable"]
    finally:
        proc.stop()
