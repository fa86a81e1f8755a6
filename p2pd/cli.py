"""Command-line entry points: argument parsing only, the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from p2pd.config import add_run_arguments, load_run_config
from p2pd.errors import ConfigError, P2PError

if TYPE_CHECKING:
    from p2pd.client.oci import Mirror


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
    if args.remove and args.hold:
        raise ConfigError("--hold writes and later removes the files: give it without "
                          "--remove")
    if args.hold:  # before writing: a signal from now on must not kill us half-way
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
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
        print(f"wrote {path}", flush=True)
    if args.hold:
        # Keep the files while this process lives: a DaemonSet's pod writes them when it
        # starts and removes them when it is deleted (uninstall), not a moment later.
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        for registry in args.registry:
            removed = remove_hosts_toml(args.hosts_dir, registry)
            print(f"removed {removed}" if removed else f"nothing of p2pd's for {registry}",
                  flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from p2pd.demo import run_demo

    return run_demo(workdir=args.workdir, layer_sizes=args.layers, keep=args.keep,
                    nodes=args.nodes)


def _mirror(args: argparse.Namespace, image: str | None = None) -> Mirror:
    from p2pd.client.oci import Mirror, auth_file, credentials
    from p2pd.core.names import ImageReference, parse_reference

    ref = parse_reference(image) if image else ImageReference("-", "-", None, None)
    auth = credentials(auth_file(args.auth_file), ref.registry) if image else None
    return Mirror(args.mirror, ref, auth)


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def _pull(args: argparse.Namespace) -> int:
    from p2pd.client.progress import Progress, human_size
    from p2pd.client.pull import pull

    with _mirror(args, args.image) as mirror:
        result = pull(mirror, args.output, Progress(not args.json))
    if args.json:
        _print_json(result.as_dict())
        return 0
    total = sum(b["size"] for b in result.blobs)
    print(f"pulled {result.image} ({result.manifest[:19]}): {len(result.blobs)} blobs, "
          f"{human_size(total)} in {result.seconds:.1f} s, digests verified")
    print(f"from     {result.sources.text()}")
    if result.output:
        print(f"written  {result.output} (OCI image layout)")
    return 0


def _preheat(args: argparse.Namespace) -> int:
    from p2pd.client.preheat import preheat
    from p2pd.client.progress import Progress, human_size

    with _mirror(args, args.image) as mirror:
        result = preheat(mirror, args.replicas, Progress(not args.json),
                         Progress(not args.json, unit="replicas"), args.timeout)
    if args.json:
        _print_json(result.as_dict())
    else:
        print(f"preheated {result.image} ({result.manifest[:19]}) on {args.replicas} "
              "nodes per blob")
        for p in result.placements:
            mark = "ok  " if p["reason"] in ("held", "fetched") else "FAIL"
            print(f"  {mark} {p['digest'][:19]} {human_size(p['size']):>10} -> {p['node']}"
                  f"{' (this node)' if p['self'] else ''}: {p['reason']}"
                  f"{' ' + p['error'] if p.get('error') else ''}")
    return 1 if result.failed else 0


def _status(args: argparse.Namespace) -> int:
    from p2pd.client.status import render

    with _mirror(args) as mirror:
        doc = mirror.admin("GET", "status")
    if args.json:
        _print_json(doc)
    else:
        print(render(doc))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from p2pd.client.doctor import as_json, doctor

    ctr = ["ctr", "--address", args.containerd_address, "--namespace", args.namespace]
    if args.host_root:
        ctr = ["chroot", str(args.host_root), *ctr]
    with _mirror(args) as mirror:
        checks = doctor(mirror, args.containerd_config, args.hosts_dir, args.registry or [],
                        args.image, ctr, args.host_root)
    report = as_json(checks)
    if args.json:
        _print_json(report)
    else:
        for check in checks:
            mark = {True: "ok  ", False: "FAIL", None: "warn"}[check.ok]
            print(f"{mark} {check.name}: {check.found}")
            if check.fix and check.ok is not True:
                print("     fix: " + check.fix.replace("\n", "\n          "))
        print("p2pd is wired into containerd" if report["ok"] else
              "p2pd is NOT fully wired: fix the FAIL lines above")
    return 0 if report["ok"] else 1


def _client_arguments(parser: argparse.ArgumentParser, *, image: bool) -> None:
    parser.add_argument("--mirror", default="http://127.0.0.1:5001", metavar="URL",
                        help="the local p2pd mirror (default http://127.0.0.1:5001)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    if image:
        parser.add_argument("image", metavar="IMAGE",
                            help="image reference, e.g. docker.io/library/alpine:3.20 or "
                            "registry.example:5000/team/app@sha256:...")
        parser.add_argument("--auth-file", type=Path, metavar="FILE",
                            help="registry credentials in docker config.json format, - "
                            "for standard input (default $REGISTRY_AUTH_FILE, "
                            "$DOCKER_CONFIG/config.json or ~/.docker/config.json)")


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
    cc.add_argument("--hold", action="store_true",
                    help="after writing, wait for SIGTERM or SIGINT, then remove the files "
                    "again (the DaemonSet's sidecar: the files live as long as the pod)")
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

    pull_cmd = sub.add_parser(
        "pull", help="fetch an image through the local daemon's swarm",
        description="Fetch every blob of IMAGE through the local p2pd (peers first, the "
        "registry for the rest), verify each against its digest, and optionally write the "
        "image as an OCI layout. A progress bar shows bytes, rate, and bytes from peers, "
        "upstream and the cache.")
    _client_arguments(pull_cmd, image=True)
    pull_cmd.add_argument("--output", "-o", type=Path, metavar="DIR",
                          help="write an OCI image layout here (default: fetch only, which "
                          "leaves the image in the daemon's cache)")
    pull_cmd.set_defaults(func=_pull)

    pre = sub.add_parser(
        "preheat", help="spread an image to K nodes before a rollout",
        description="Fetch IMAGE into this node's daemon (with your credentials), then have "
        "the K nodes the swarm places each blob on fetch it from peers, so that a rollout "
        "finds every blob in the cluster. Replicas never contact the registry and receive "
        "no credentials. Exit status 1 if any replica failed.")
    _client_arguments(pre, image=True)
    pre.add_argument("--replicas", "-k", type=int, default=3, metavar="K",
                     help="nodes per blob (default 3)")
    pre.add_argument("--timeout", type=float, default=600.0, metavar="S",
                     help="seconds to wait for one replica (default 600)")
    pre.set_defaults(func=_preheat)

    st = sub.add_parser(
        "status", help="what this node's daemon sees and did",
        description="Members seen, cache use, blobs in cache and in flight, and for recent "
        "pulls the bytes by source (cache, peers, upstream) and registry egress saved.")
    _client_arguments(st, image=False)
    st.set_defaults(func=_status)

    doc = sub.add_parser(
        "doctor", help="check that containerd pulls through p2pd, and say what to fix",
        description="Check the daemon (running, cache writable, peers reachable), "
        "containerd's config (config_path of the CRI plugin), the hosts.toml of each "
        "registry, and with --image prove it: ctr resolves the image through the hosts "
        "directory and the daemon must see the request. Exit status 1 if a check fails.")
    _client_arguments(doc, image=False)
    doc.add_argument("--containerd-config", type=Path, metavar="FILE",
                     default=Path("/etc/containerd/config.toml"),
                     help="containerd's config (default /etc/containerd/config.toml)")
    doc.add_argument("--hosts-dir", type=Path, metavar="DIR",
                     help="hosts directory to check (default: config_path from the config)")
    doc.add_argument("--registry", action="append", metavar="HOST",
                     help="registry whose hosts.toml to check (repeatable; default: the "
                     "daemon's configured registries and its default registry)")
    doc.add_argument("--image", metavar="IMAGE",
                     help="resolve this image with ctr to prove the wiring end to end")
    doc.add_argument("--containerd-address", default="/run/containerd/containerd.sock",
                     metavar="SOCK", help="containerd's socket, for ctr")
    doc.add_argument("--namespace", default="k8s.io",
                     help="containerd namespace for ctr (default k8s.io)")
    doc.add_argument("--host-root", type=Path, metavar="DIR",
                     help="the node's file system is mounted here (doctor in a pod, e.g. "
                     "kubectl debug node/NAME --profile=sysadmin: /host); host paths are "
                     "read below it and ctr runs chrooted into it")
    doc.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``p2pd`` command line."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, P2PError) as exc:
        print(f"p2pd: {exc}", file=sys.stderr)
        return 2
