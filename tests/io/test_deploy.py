"""deploy/ stays in step with the daemon: the DaemonSet with what `p2pd run` accepts, the
Grafana dashboard with the metrics it exports."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from p2pd.cli import build_parser
from p2pd.config import load_run_config
from p2pd.io.metrics import Metrics

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
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
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
    [p2pd] = pod["containers"]
    assert p2pd["securityContext"]["runAsNonRoot"] and p2pd["securityContext"][
        "capabilities"]["drop"] == ["ALL"]
    assert p2pd["resources"]["requests"] and p2pd["resources"]["limits"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert p2pd[probe]["httpGet"]["path"] == "/healthz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["hostPath"]["path"] == "/var/lib/p2pd"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
