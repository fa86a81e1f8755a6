"""Test lab: start real docker-registry / containerd processes, build and push images.

Everything here is synchronous (subprocesses and threads) so it can be used from
plain pytest fixtures, demo scripts and benchmarks alike.
"""

from p2pd.lab.containerd import Containerd, CtrError
from p2pd.lab.images import (
    Blob,
    Image,
    PushedImage,
    build_image,
    manifest_digest,
    push_image,
)
from p2pd.lab.netns import Lan, Node, NsP2pd, NsRegistry, netns_unavailable, start_registry
from p2pd.lab.procs import Proc, free_port, missing_bins, wait_http
from p2pd.lab.proxy import TcpProxy, TokenBucket
from p2pd.lab.registry import Registry

__all__ = [
    "Blob",
    "Containerd",
    "CtrError",
    "Image",
    "Lan",
    "Node",
    "NsP2pd",
    "NsRegistry",
    "Proc",
    "PushedImage",
    "Registry",
    "TcpProxy",
    "TokenBucket",
    "build_image",
    "free_port",
    "manifest_digest",
    "missing_bins",
    "netns_unavailable",
    "push_image",
    "start_registry",
    "wait_http",
]
