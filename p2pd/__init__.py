"""p2pd: peer-to-peer container image distribution for containerd.

The daemon (``p2pd.daemon.run_daemon``) answers containerd's OCI pull API as a registry
mirror and keeps layers as verified pieces in a disk cache. ``p2pd.core`` holds every
decision without I/O; ``p2pd.io`` performs them with trio.
"""

__version__ = "0.1.0"
