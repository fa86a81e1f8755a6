"""containerd 1.6 accepts the hosts.toml that ``p2pd containerd-config`` writes."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd
from p2pd.lab.images import PushedImage
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("entry", ["registry", "_default"])
def test_ctr_pulls_through_the_mirror_of_a_generated_hosts_toml(
    tmp_path: Path, registry: Registry, pushed_image: PushedImage, containerd: Containerd,
    entry: str,
) -> None:
    """No ``--server``: for the registry's own entry the fallback is https:// on a plain-HTTP
    registry, which cannot work, so a successful pull was served by the mirror."""
    hosts = tmp_path / "hosts"
    name = registry.host if entry == "registry" else "_default"
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url}) as daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PD_")}
        subprocess.run(
            [sys.executable, "-m", "p2pd", "containerd-config", "--registry", name,
             "--mirror", daemon.url, "--hosts-dir", str(hosts)],
            check=True, capture_output=True, text=True, timeout=30, env=env,
        )
        doc = tomllib.loads((hosts / name / "hosts.toml").read_text())
        assert list(doc["host"]) == [daemon.url]
        if entry == "registry":
            assert doc["server"] == f"https://{registry.host}"

        containerd.pull(pushed_image.ref, hosts_dir=hosts)
        assert pushed_image.ref in containerd.image_refs()
        assert containerd.snapshot_keys(), "the image was not unpacked"
        served = daemon.metric("p2pd_blob_bytes_served_total", source="download")
        assert served > 0
        assert served == pushed_image.image.blob_bytes
