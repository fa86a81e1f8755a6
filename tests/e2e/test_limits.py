"""Bandwidth limits: upstream, upload to peers, download from peers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.core.messages import Lookup, Peers
from p2pd.core.tuning import BUSY_AFTER
from p2pd.io.peer import open_peer_link
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


async def test_a_full_upload_queue_refuses_busy_at_once(
    tmp_path: Path, registry: Registry, layer: tuple[str, bytes, int],
) -> None:
    """One slot (busy for seconds at 256 KiB/s): 4 requests wait for it (the default) and
    are refused when BUSY_AFTER is up; requests beyond those are refused at once."""
    url, truth, size = layer
    digest = url.split("/blobs/")[1].split("?")[0]
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    default_registry=registry.host, peer_port=0, node_id="node-a",
                    extra=["--max-uploads", "1", "--upload-limit", "256KiB/s"]) as daemon:
        assert _timed_get(daemon, url)[0] == truth
        answers: dict[str, tuple[float, bool]] = {}  # name -> (when, got the piece)
        began = trio.current_time()

        async def ask(name: str) -> None:
            async with open_peer_link(daemon.peer_addr, name, None) as link:
                data = await link.request_piece(digest, size, 0)
                answers[name] = (trio.current_time() - began, data is not None)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "holder")
                await trio.sleep(0.3)  # it has the slot now (paying 4 s at 256 KiB/s)
                for i in range(6):
                    nursery.start_soon(ask, f"asker-{i}")
    assert answers.pop("holder")[1]  # the one slot's piece
    refusals = sorted(answers.values())
    assert len(refusals) == 6 and not any(got for _, got in refusals)
    refused_at_once, refused_after_wait = refusals[:2], refusals[2:]
    # two did not wait for a slot; the others waited BUSY_AFTER for one
    assert max(t for t, _ in refused_at_once) + BUSY_AFTER / 2 < min(
        t for t, _ in refused_after_wait)


async def test_a_lookup_is_not_stuck_behind_a_piece_upload_on_the_same_connection(
    tmp_path: Path, registry: Registry, layer: tuple[str, bytes, int],
) -> None:
    url, truth, size = layer
    digest = url.split("/blobs/")[1].split("?")[0]
    with P2pd.start(tmp_path / "p2pd", registries={registry.host: registry.url},
                    default_registry=registry.host, peer_port=0, node_id="node-a",
                    extra=["--upload-limit", "256KiB/s"]) as daemon:
        assert _timed_get(daemon, url)[0] == truth
        order: list[str] = []
        async with open_peer_link(daemon.peer_addr, "node-b", None) as link:

            async def piece(index: int) -> None:
                assert await link.request_piece(digest, size, index) is not None
                order.append(f"piece {index}")

            async def lookup() -> None:
                answer = await link.call(lambda rid: Lookup(rid, digest, size))
                assert isinstance(answer, Peers)
                order.append("lookup")

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for index in range(3):  # 3 MiB to send at 256 KiB/s: seconds
                        nursery.start_soon(piece, index)
                    await trio.sleep(0.2)
                    nursery.start_soon(lookup)
    assert order[0] == "lookup" and sorted(order[1:]) == ["piece 0", "piece 1", "piece 2"]
