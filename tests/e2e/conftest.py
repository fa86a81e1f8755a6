"""Fixtures that start real lab components (docker-registry, containerd) for e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.lab.containerd import Containerd
from p2pd.lab.images import Image, PushedImage, build_image, push_image
from p2pd.lab.procs import missing_bins
from p2pd.lab.registry import Registry

MiB = 1024 * 1024
SMALL_LAYERS = (1 * MiB, 3 * MiB, 5 * MiB)
SMALL_SEED = 42
REPO = "lab/small"
AUTH = ("labuser", "labpass")


def require_bins(*names: str) -> None:
    """Skip the calling test if any of the executables is not installed."""
    missing = missing_bins(*names)
    if missing:
        pytest.skip(f"e2e: required executables not installed: {', '.join(missing)}")


@pytest.fixture(scope="session")
def image_spec() -> tuple[tuple[int, ...], int]:
    """``(layer_sizes, seed)`` used to build the ``image`` fixture."""
    return SMALL_LAYERS, SMALL_SEED


@pytest.fixture(scope="session")
def image(
    tmp_path_factory: pytest.TempPathFactory, image_spec: tuple[tuple[int, ...], int]
) -> Image:
    """A small deterministic 3-layer OCI layout (1, 3 and 5 MiB layers), built once."""
    sizes, seed = image_spec
    return build_image(tmp_path_factory.mktemp("image") / "layout", sizes, seed=seed)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh anonymous docker-registry on loopback."""
    require_bins("docker-registry")
    with Registry.start(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[Registry]:
    """A docker-registry requiring basic auth; credentials in ``.creds``."""
    require_bins("docker-registry", "htpasswd")
    with Registry.start(tmp_path / "auth-registry", htpasswd=AUTH) as reg:
        yield reg


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A fresh private containerd instance with its own root, state and socket."""
    require_bins("containerd", "ctr")
    with Containerd.start(tmp_path / "containerd") as ctd:
        yield ctd


@pytest.fixture
def pushed_image(image: Image, registry: Registry) -> PushedImage:
    """The small image pushed to ``registry`` as ``lab/small:latest``."""
    require_bins("skopeo")
    push_image(image, registry.host, REPO)
    return PushedImage(image, registry.host, REPO, image.tag)
