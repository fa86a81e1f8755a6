"""Command-line entry points: argument parsing only, the work is elsewhere."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from p2pd.config import add_run_arguments, load_run_config
from p2pd.errors import ConfigError, P2PError


def _run(args: argparse.Namespace) -> int:
    from p2pd.daemon import serve_until_signalled

    config = load_run_config(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Our own lines say what each upstream request was for; httpx's repeat them.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    # Worker threads (piece writes, hashing) release the GIL for their syscalls and need
    # it back afterwards; with the default 5 ms switch interval each handback can wait
    # that long behind the event loop. 1 ms halves the cost of a cold download here.
    sys.setswitchinterval(0.001)
    try:
        trio.run(serve_until_signalled, config)
    except (OSError, ExceptionGroup) as exc:
        cause = _first_os_error(exc)
        if cause is None:
            raise
        print(f"p2pd: cannot run: {cause}", file=sys.stderr)
        return 2
    return 0


def _first_os_error(exc: BaseException) -> OSError | ConfigError | None:
    """The error behind a start-up failure (a busy port, an unusable cache directory, a
    discovery spec that does not fit the node)."""
    if isinstance(exc, (OSError, ConfigError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_os_error(inner)
            if found is not None:
                return found
    return None


def _containerd_config(args: argparse.Namespace) -> int:
    from p2pd.hosts import check_writable, remove_hosts_toml, write_hosts_toml

    if args.server and len(args.registry) > 1:
        raise ConfigError("--server names one registry's fallback: give one --registry with it")
    if args.remove:
        for registry in args.registry:
            path = remove_hosts_toml(args.hosts_dir, registry)
            print(f"removed {path}" if path else f"nothing of p2pd's for {registry}")
        return 0
    # Check every file first, so a refusal leaves nothing half-written.
    for registry in args.registry:
        check_writable(args.hosts_dir, registry, args.mirror, server=args.server,
                       force=args.force)
    for registry in args.registry:
        path = write_hosts_toml(args.hosts_dir, registry, args.mirror, server=args.server,
                                force=args.force)
        print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from p2pd.demo import run_demo

    return run_demo(workdir=args.workdir, layer_sizes=args.layers, keep=args.keep,
                    nodes=args.nodes)


def build_parser() -> argparse.ArgumentParser:
    """The ``p2pd`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="p2pd",
        description="Peer-to-peer container image distribution: a registry mirror for "
        "containerd that shares layer pieces between nodes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run the daemon",
        description="Run the p2pd daemon. Every flag can also be given in the TOML file "
        "named by --config (same key without the dashes prefix, e.g. cache-size = "
        "\"10GiB\") or as a P2PD_* environment variable. Flags win over the environment, "
        "which wins over the file.",
    )
    add_run_arguments(run)
    run.set_defaults(func=_run)

    cc = sub.add_parser(
        "containerd-config", help="write containerd hosts.toml files that use p2pd",
        description="Write HOSTS_DIR/<registry>/hosts.toml so that containerd pulls "
        "through the p2pd mirror and falls back to the registry itself. Files p2pd did "
        "not write are never overwritten (unless --force) or removed.",
    )
    cc.add_argument("--registry", action="append", required=True, metavar="HOST",
                    help="registry host, e.g. docker.io or 127.0.0.1:5000; _default for "
                    "every registry without its own directory (repeatable)")
    cc.add_argument("--mirror", default="http://127.0.0.1:5001", metavar="URL",
                    help="URL of the local p2pd mirror (default http://127.0.0.1:5001)")
    cc.add_argument("--hosts-dir", type=Path, default=Path("/etc/containerd/certs.d"),
                    metavar="DIR", help="containerd's config_path (default "
                    "/etc/containerd/certs.d)")
    cc.add_argument("--server", metavar="URL", help="fallback registry URL (default "
                    "https://HOST; https://registry-1.docker.io for docker.io)")
    cc.add_argument("--force", action="store_true",
                    help="overwrite a hosts.toml that p2pd did not write")
    cc.add_argument("--remove", action="store_true",
                    help="remove the hosts.toml files p2pd wrote, and only those")
    cc.set_defaults(func=_containerd_config)

    demo = sub.add_parser(
        "demo", help="run the local end-to-end demo (registry, p2pd, containerd)",
        description="Start a local docker-registry with a generated image, several p2pd "
        "daemons and a standalone containerd; pull the image through each daemon in turn "
        "(the first from the registry, the others from peers, then the first again from "
        "its cache) and straight from the registry, and report where the bytes came from.",
    )
    demo.add_argument("--workdir", type=Path, default=None,
                      help="directory for the demo's state (default: a temporary one)")
    demo.add_argument("--layers", type=lambda s: [int(float(x) * (1 << 20))
                                                  for x in s.split(",")],
                      default=[8 << 20, 24 << 20, 64 << 20], metavar="MiB,MiB,...",
                      help="layer sizes in MiB (default 8,24,64)")
    demo.add_argument("--nodes", type=int, default=3,
                      help="how many p2pd daemons (default 3)")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``p2pd`` command line."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, P2PError) as exc:
        print(f"p2pd: {exc}", file=sys.stderr)
        return 2
