"""``p2pd doctor``: is this node wired so that containerd pulls through p2pd?

Each check is a :class:`Check` with what was found and, when it fails, what to do. The
last one proves the wiring instead of reading it: it has ``ctr`` resolve an image with
the same hosts directory the CRI plugin uses, and looks for that manifest request in the
daemon's own record of requests.
"""

from __future__ import annotations

import subprocess
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from p2pd.client.oci import ClientError, Mirror
from p2pd.client.progress import human_size
from p2pd.core.names import parse_reference

CRI_V2 = "io.containerd.grpc.v1.cri"  # containerd 1.x (config version 2)
CRI_V3 = "io.containerd.cri.v1.images"  # containerd 2.x (config version 3)
PROOF_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Check:
    """One check: ``ok`` is True (passed), False (failed) or None (a warning)."""

    name: str
    ok: bool | None
    found: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Wiring:
    """Where containerd looks, from its config file."""

    config_path: list[Path]
    problems: list[str]


def read_containerd_config(path: Path) -> Wiring:
    """The hosts directories containerd's CRI plugin reads, and what is wrong with the
    file for pulling through a mirror."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return Wiring([], [f"cannot read {path}: {exc}"])
    version = doc.get("version", 1)
    plugin = CRI_V3 if version == 3 else CRI_V2
    problems = []
    if plugin in doc.get("disabled_plugins", []) or CRI_V2 in doc.get("disabled_plugins", []):
        problems.append(f"the CRI plugin is disabled (disabled_plugins lists {plugin}): "
                        "the kubelet cannot pull through this containerd")
    registry = doc.get("plugins", {}).get(plugin, {}).get("registry", {})
    if version < 2:
        problems.append(f"config version {version}: containerd reads config_path only from "
                        "version 2 (containerd 1.x) or 3 (2.x) files")
    if registry.get("mirrors"):
        problems.append("registry.mirrors is set: containerd ignores config_path (or "
                        "refuses to start) while the deprecated mirrors table is there")
    raw = registry.get("config_path", "")
    dirs = [Path(p) for p in str(raw).split(":") if p]
    return Wiring(dirs, problems)


def _hosts_entries(hosts_toml: Path) -> tuple[str | None, dict[str, Any]]:
    doc = tomllib.loads(hosts_toml.read_text())
    return doc.get("server"), doc.get("host", {})


def _same_endpoint(url: str, mirror_addr: str) -> bool:
    """Whether ``url`` (a hosts.toml host) reaches the mirror listening on
    ``mirror_addr`` (``HOST:PORT``; a wildcard listen address matches loopback)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host, _, port = mirror_addr.rpartition(":")
    hosts = {host.strip("[]")}
    if host in ("0.0.0.0", "[::]", "::"):
        hosts |= {"127.0.0.1", "localhost", "::1"}
    if host == "127.0.0.1":
        hosts.add("localhost")
    return parts.hostname in hosts and str(parts.port or 80) == port


def check_hosts(dirs: list[Path], registries: list[str], mirror_addr: str) -> list[Check]:
    """One check per registry: does its hosts.toml (or ``_default``'s) send pulls to the
    mirror, with the registry itself as the fallback?"""
    checks = []
    for registry in registries:
        name = f"hosts.toml for {registry}"
        candidates = [d / registry / "hosts.toml" for d in dirs] + \
            [d / "_default" / "hosts.toml" for d in dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            checks.append(Check(name, False, "no hosts.toml in " + ", ".join(map(str, dirs)),
                                f"p2pd containerd-config --registry {registry} --mirror "
                                f"http://{mirror_addr} --hosts-dir {dirs[0]}"))
            continue
        try:
            server, hosts = _hosts_entries(found)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            checks.append(Check(name, False, f"{found}: {exc}", "fix the TOML syntax"))
            continue
        ours = [(url, h) for url, h in hosts.items() if _same_endpoint(url, mirror_addr)]
        if not ours:
            checks.append(Check(name, False, f"{found} names no host at {mirror_addr}",
                                f"p2pd containerd-config --registry {registry} --mirror "
                                f"http://{mirror_addr} --hosts-dir {found.parent.parent}"))
            continue
        url, entry = ours[0]
        capabilities = set(entry.get("capabilities", ["pull", "resolve", "push"]))
        if not {"pull", "resolve"} <= capabilities:
            checks.append(Check(name, False, f"{found}: {url} has capabilities "
                                f"{sorted(capabilities)}", 'set capabilities = ["pull", '
                                '"resolve"] for the mirror host'))
            continue
        if server is None and found.parent.name != "_default":
            checks.append(Check(name, None, f"{found}: mirror {url}, no server fallback",
                                "add server = \"https://REGISTRY\" so pulls survive p2pd "
                                "being down"))
            continue
        fallback = server or "the registry host"
        checks.append(Check(name, True, f"{found}: mirror {url}, fallback {fallback}"))
    return checks


def check_daemon(status: dict[str, Any]) -> list[Check]:
    """The daemon's own view: cache writable, peers reachable."""
    cache = status["cache"]
    checks = [Check("cache", bool(cache["writable"]),
                    f"{cache['dir']}: {cache['blobs']} blobs, {human_size(cache['used_bytes'])} "
                    f"of {human_size(cache['limit_bytes'])}" + (f"; {cache['error']}"
                                                      if cache["error"] else ""),
                    "" if cache["writable"] else
                    f"make {cache['dir']} writable by the daemon's user (in the DaemonSet "
                    "the init container owns it to uid 10001)")]
    if status.get("peer_addr") is None:
        checks.append(Check("peers", None, "no peer port or no --peers: this node shares "
                            "nothing", "start p2pd with --peer-listen and --peers"))
        return checks
    others = [m for m in status["members"] if not m["self"]]
    down = [m["addr"] for m in others if m["state"] != "alive"]
    if not others:
        checks.append(Check("peers", None, "no other daemon found yet",
                            "check the --peers setting (e.g. the headless Service's DNS "
                            "name) and that the peer port is open between nodes"))
    elif down:
        checks.append(Check("peers", False, f"{len(others) - len(down)} of {len(others)} "
                            f"reachable; not answering: {', '.join(down[:10])}",
                            "check that the peer port is open between nodes (host "
                            "firewall, NetworkPolicy) and those daemons run"))
    else:
        checks.append(Check("peers", True, f"{len(others)} other daemons, all reachable"))
    return checks


def prove(mirror: Mirror, image: str, hosts_dir: Path, ctr: list[str]) -> Check:
    """Resolve ``image`` with ``ctr`` through ``hosts_dir`` and see the daemon get it."""
    ref = parse_reference(image)
    before = time.time()
    cmd = [*ctr, "content", "fetch", "--metadata-only", "--hosts-dir", str(hosts_dir), image]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("pull through p2pd", False, f"{' '.join(cmd)}: {exc}",
                     "is ctr installed and containerd running (--containerd-address)?")
    deadline = time.monotonic() + PROOF_WAIT
    while True:
        seen = [m for m in mirror.admin("GET", "status").get("manifests", [])
                if m["at"] >= before and m["name"] == ref.name]
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if seen:
        return Check("pull through p2pd", True, f"ctr resolved {image}; p2pd answered its "
                     f"manifest request ({seen[0]['status']})")
    error = (run.stderr.strip().splitlines() or [""])[-1]
    return Check("pull through p2pd", False, f"ctr resolved {image} (exit {run.returncode}"
                 f"{': ' + error if error else ''}) but the request never reached p2pd",
                 f"containerd does not use {hosts_dir} for {ref.registry}: see the checks "
                 "above")


def doctor(mirror: Mirror, containerd_config: Path, hosts_dir: Path | None,
           registries: list[str], image: str | None, ctr: list[str],
           host_root: Path | None = None) -> list[Check]:
    """Every check, in the order a person would fix them.

    ``host_root`` is where the node's file system is mounted when doctor runs in a pod
    (``kubectl debug node/...`` mounts it at ``/host``): host paths are read below it,
    and ``ctr`` (given ready to run on the host, e.g. through ``chroot``) gets them as
    they are.
    """
    def on_host(path: Path) -> Path:
        return host_root / path.relative_to("/") if host_root and path.is_absolute() else path

    try:
        status = mirror.admin("GET", "status")
    except ClientError as exc:
        return [Check("daemon", False, str(exc), "is p2pd running? (kubectl -n p2pd get "
                      "pods -o wide; journal or pod logs)")]
    checks = [Check("daemon", True, f"p2pd {status['version']} node {status['node_id']} "
                    f"mirror {status['mirror']}")]
    checks += check_daemon(status)
    wiring = read_containerd_config(on_host(containerd_config))
    dirs = [hosts_dir] if hosts_dir else wiring.config_path
    for problem in wiring.problems:
        checks.append(Check("containerd config", False, problem,
                            f"edit {containerd_config}, then restart containerd"))
    if hosts_dir is None and not wiring.config_path:
        checks.append(Check("containerd config", False,
                            f"{containerd_config} sets no registry config_path",
                            f'add to {containerd_config}:\n  [plugins."{CRI_V2}".registry]\n'
                            '    config_path = "/etc/containerd/certs.d"\n'
                            "then restart containerd (systemctl restart containerd)"))
        return checks
    if not wiring.problems and wiring.config_path:
        checks.append(Check("containerd config", True, f"{containerd_config}: config_path "
                            + ":".join(map(str, wiring.config_path))))
    wanted = registries or sorted({*status["registries"], status["default_registry"]})
    checks += check_hosts([on_host(d) for d in dirs], wanted, status["mirror"])
    if image:
        checks.append(prove(mirror, image, dirs[0], ctr))
    return checks


def as_json(checks: list[Check]) -> dict[str, Any]:
    """The ``--json`` form."""
    return {"ok": all(c.ok is not False for c in checks), "checks": [asdict(c) for c in checks]}
