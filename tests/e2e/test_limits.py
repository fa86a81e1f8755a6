"""Bandwidth limits: upstream, upload to peers, download from peers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from p2pd.lab.daemon import P2pd, start_swarm
from p2pd.lab.images import build_image, push_image
from p2pd.lab.registry import Registry

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def _timed_get(daemon: P2pd, url: str) -> tuple[bytes, float]:
    started = time.monotonic()
    body = httpx.get(daemon.url + url, trust_env=False, timeout=60).content
    return body, time.monotonic() - started


@pytest.fixture
def layer(tmp_path: Path, registry: Registry) -> tuple[str, bytes, int]:
    image = build_image(tmp_path / "image", [8 * MiB], seed=11)
    push_image(image, registry.host, "limits/app")
    blob = image.layers[0]
    url = f"/v2/limits/app/blobs/{blob.digest}?ns={registry.host}"
    return url, image.blob_path(blob.digest).read_bytes(), blob.size


def test_upstream_limit(tmp_path: Path, registry: Registry, layer: tuple[str, bytes, int]) -> None:
    url, truth, size = layer
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    extra=["--upstream-limit", "4MiB/s"]) as daemon:
        body, seconds = _timed_get(daemon, url)
    assert body == truth
    assert seconds >= (size - 1 * MiB) / (4 * MiB)  # the bucket may start with a burst


@pytest.mark.parametrize("flag", ["--upload-limit", "--download-limit"])
def test_peer_limits(
    tmp_path: Path, registry: Registry, layer: tuple[str, bytes, int], flag: str,
) -> None:
    url, truth, size = layer
    with start_swarm(tmp_path, registry.url, registry.host, 2, flag, "32Mbit") as (a, b):
        assert _timed_get(a, url)[0] == truth  # from the registry: not limited
        body, seconds = _timed_get(b, url)
        assert body == truth
        assert b.metric("p2pd_blob_bytes_fetched_total", source="peer") == size
        assert seconds >= (size - 1 * MiB) / (4 * MiB)  # 32 Mbit/s = 4 MB/s
