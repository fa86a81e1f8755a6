"""Side-by-side benchmark of p2pd's mirror against pulling straight from the registry.

Run with ``python -m benchmarks.bench_mirror [--size-mb 200] [--repeat 3] [--json FILE]``.
Everything is started here, on 127.0.0.1 only, and torn down at the end:

* a docker-registry in a temporary directory, with two generated images pushed to it;
* a private containerd (own root, state and socket);
* p2pd daemons via :class:`p2pd.lab.daemon.P2pd` (``--log-level info``).

Measured, in one run:

(A) **cached blob GET.** One layer of ``--size-mb`` MiB. One warm-up GET through p2pd
    fills its cache (and is checked byte for byte), one warm-up GET from the registry
    warms the page cache. Then ``--repeat`` rounds, each with one
    ``curl -o /dev/null`` GET through p2pd and one straight from the registry (order
    alternating per round). Reported: median MiB/s each and p2pd/direct (target >= 1.0).

(B) **cold ``ctr images pull``.** A 3-layer image of ``--size-mb`` MiB in total (10 %,
    30 %, 60 %). ``--repeat`` rounds of one pull through a *fresh* p2pd (new process,
    empty cache dir; hosts.toml from ``p2pd containerd-config``) and one direct pull
    (hosts.toml whose only host is the registry), order alternating; the image and all
    its content/snapshots are removed from containerd after every pull. Reported:
    median seconds each and p2pd/direct (target <= 1.05).

(A2) **cached blob GET, settled** (informational): after (A), ``--settle`` idle seconds
    and one untimed GET through p2pd, the (A) rounds again. p2pd treats pieces it wrote
    moments ago differently from settled ones (verify-on-read vs ``sendfile``); this row
    shows the steady state next to the just-filled one.

p2pd's peak RSS (``VmHWM`` of the ``python -m p2pd run`` process) is reported for (A)
(the cache-filling warm-up, and the serving rounds after resetting the peak with
``/proc/PID/clear_refs``) and for (B) (max over the fresh daemons). CPU seconds are read
from ``/proc/PID/stat``: per GET for the serving process in (A), and per pull for
containerd, ctr, the registry and p2pd in (B).

Other options: ``--pin`` runs curl on its own CPU in (A) (loopback throughput on a small
machine depends a lot on whether client and server share a core); ``--code`` chooses
the p2pd code the daemons run (a copy of the work tree taken at start by default, so
edits during a run cannot mix in; or a git revision, or a directory); ``--only a|b``;
``--keep`` keeps the work dir with every log; ``--profile DIR`` adds an unmeasured phase
that records p2pd with py-spy (speedscope files in DIR) while it serves cached GETs
(just filled, and settled) and during one cold pull, and prints where the samples fall.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pd.cli import build_parser
from p2pd.config import load_run_config
from p2pd.lab.containerd import Containerd
from p2pd.lab.daemon import P2pd
from p2pd.lab.images import Image, build_image, push_image
from p2pd.lab.procs import missing_bins
from p2pd.lab.registry import Registry

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_LEVEL = ["--log-level", "info"]
REPO_A = "bench/single"
REPO_B = "bench/layers"
B_SPLIT = (0.10, 0.30, 0.60)
REQUIRED = ("docker-registry", "containerd", "ctr", "skopeo", "curl")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# curl must never go through a proxy from the environment: loopback only.
CURL_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def say(msg: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``) in KiB."""
    return int(proc_status(pid)[key].split()[0])


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def describe_pid(pid: int) -> dict[str, Any]:
    """What runs as ``pid``: executable, command line, threads, child processes."""
    exe = os.readlink(f"/proc/{pid}/exe")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    return {
        "pid": pid,
        "exe": exe,
        "cmdline": [c.decode() for c in cmdline if c],
        "is_python": "python" in Path(exe).name,
        "threads": int(proc_status(pid)["Threads"]),
        "child_pids": children,
    }


# --------------------------------------------------------------------------- helpers


@dataclass
class CurlResult:
    code: int
    size: int
    seconds: float

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads created later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(task.name), cpus)


# With --pin, (A) runs curl on CURL_CPUS and the servers on SERVER_CPUS.
CURL_CPUS: set[int] | None = None
SERVER_CPUS: set[int] | None = None


def curl_get(url: str, out: str = "/dev/null") -> CurlResult:
    """GET ``url`` with curl; curl's own byte count and total time."""
    cpus = CURL_CPUS
    res = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "-o", out,
         "-w", "%{http_code} %{size_download} %{time_total}", url],
        capture_output=True, text=True, timeout=600, env=CURL_ENV, check=False,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    parts = res.stdout.split()
    if res.returncode != 0 or len(parts) != 3:
        raise RuntimeError(f"curl {url} failed ({res.returncode}): {res.stdout} {res.stderr}")
    return CurlResult(int(parts[0]), int(parts[1]), float(parts[2]))


def checked_get(url: str, size: int, what: str, out: str = "/dev/null") -> CurlResult:
    got = curl_get(url, out)
    if got.code != 200 or got.size != size:
        raise RuntimeError(f"{what}: HTTP {got.code}, {got.size} bytes, expected {size}")
    return got


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def start_p2pd(workdir: Path, registry: Registry) -> P2pd:
    """A p2pd whose upstream for the registry host is the registry itself (no proxy)."""
    return P2pd.start(
        workdir,
        registries={registry.host: registry.url},
        default_registry=registry.host,
        extra=LOG_LEVEL,
    )


def effective_log_level(daemon: P2pd) -> str:
    """The log level p2pd's own parser derives from the daemon's argv (last flag wins)."""
    argv = daemon.args[daemon.args.index("run"):]
    return load_run_config(build_parser().parse_args(argv), environ={}).log_level


def write_mirror_hosts(hosts_dir: Path, registry: Registry, mirror: str) -> Path:
    """hosts.toml that sends the registry through ``mirror`` (p2pd's own command)."""
    subprocess.run(
        [sys.executable, "-m", "p2pd", "containerd-config", "--registry", registry.host,
         "--mirror", mirror, "--server", registry.url, "--hosts-dir", str(hosts_dir)],
        check=True, capture_output=True, text=True,
    )
    return hosts_dir


def write_direct_hosts(hosts_dir: Path, registry: Registry) -> Path:
    """hosts.toml for a direct pull.

    ctr 1.6 ignores a hosts.toml that has only ``server`` (no ``[host]`` tree), so the
    registry is listed as the one host too (as in tests/e2e/test_lab.py).
    """
    path = hosts_dir / registry.host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'server = "{registry.url}"\n\n'
        f'[host."{registry.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return hosts_dir


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- code


def tree_hash(root: Path) -> str:
    """sha256 over the relative paths and contents of every ``*.py`` under ``root``."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                          text=True, check=True).stdout.strip()


def prepare_code(which: str, work: Path) -> dict[str, Any]:
    """Make the daemons run a fixed copy of p2pd, so edits during the run cannot mix in.

    ``live``: the repository's p2pd as it is when each daemon starts. ``worktree``: a copy
    of the repository's ``p2pd/`` taken now. A directory: a copy of the p2pd package in
    it. Anything else is a git revision exported with ``git archive``. The copy is put
    first on the daemons' ``PYTHONPATH`` and the benchmark changes into ``work``
    (``python -m`` puts the cwd first on ``sys.path``).
    """
    info: dict[str, Any] = {"code": which}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_head"] = git("rev-parse", "--short", "HEAD")
        if which in ("worktree", "live"):
            info["git_dirty_p2pd"] = bool(git("status", "--porcelain", "--", "p2pd"))
    src = work / "src"
    if which == "live":
        pkg = REPO_ROOT / "p2pd"
    elif which == "worktree":
        pkg = src / "p2pd"
        shutil.copytree(REPO_ROOT / "p2pd", pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif Path(which).is_dir():
        given = Path(which).resolve()
        given = given / "p2pd" if (given / "p2pd" / "__init__.py").is_file() else given
        if not (given / "__init__.py").is_file() or given.name != "p2pd":
            raise RuntimeError(f"{which} is neither a p2pd package nor a directory holding one")
        info["code_dir"] = str(given)
        pkg = src / "p2pd"
        shutil.copytree(given, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        src.mkdir()
        info["git_ref"] = git("rev-parse", "--short", which)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", which, "p2pd"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        pkg = src / "p2pd"
    if which != "live":
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(src) + (os.pathsep + old if old else "")
    os.chdir(work)
    loaded = subprocess.run([sys.executable, "-c", "import p2pd; print(p2pd.__file__)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if Path(loaded).resolve().parent != pkg.resolve():
        raise RuntimeError(f"daemons would import {loaded}, not {pkg}")
    info["p2pd_path"] = str(pkg)
    info["p2pd_tree_sha256"] = tree_hash(pkg)
    return info


# --------------------------------------------------------------------------- results


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    def first_line(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "?"
        return out.strip().splitlines()[0] if out.strip() else "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return {
        "nproc": int(first_line("nproc")),
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "ctr": first_line("ctr", "--version"),
        "curl": first_line("curl", "--version"),
        "mem_total_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MiB,
    }


# --------------------------------------------------------------------------- (A)


def interleaved_gets(
    label: str, urls: dict[str, tuple[str, int]], size: int, repeat: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``repeat`` rounds of one GET per URL (order alternating); MiB/s and server CPU s.

    ``urls`` maps a name to ``(url, pid of the process serving it)``.
    """
    names = list(urls)
    speed: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(repeat):
        for which in names if rnd % 2 == 0 else names[::-1]:
            url, pid = urls[which]
            c0 = cpu_seconds(pid)
            got = checked_get(url, size, f"{which} GET")
            cpu[which].append(cpu_seconds(pid) - c0)
            speed[which].append(got.mib_s)
            say(f"{label} round {rnd + 1}/{repeat} {which:6s}: {got.mib_s:8.1f} MiB/s "
                f"({got.seconds:.3f} s, server CPU {cpu[which][-1]:.2f} s)")
    return speed, cpu


def bench_a(
    work: Path, registry: Registry, image: Image, repeat: int, settle: float,
) -> dict[str, Any]:
    layer = image.layers[0]
    with start_p2pd(work / "a", registry) as daemon:
        pid = daemon.proc.pid
        level = effective_log_level(daemon)
        if level != "info":
            raise RuntimeError(f"p2pd runs with log level {level!r}, not info: {daemon.args}")
        via = f"{daemon.url}/v2/{REPO_A}/blobs/{layer.digest}?ns={registry.host}"
        direct = f"{registry.url}/v2/{REPO_A}/blobs/{layer.digest}"
        urls = {"p2pd": (via, pid), "direct": (direct, registry.proc.pid)}
        if SERVER_CPUS:
            set_affinity(pid, SERVER_CPUS)
            set_affinity(registry.proc.pid, SERVER_CPUS)

        say(f"(A) warm-up: GET {layer.size / MiB:.1f} MiB through p2pd (fills its cache)")
        body = work / "a-warmup.bin"
        cpu0 = cpu_seconds(pid)
        fill = checked_get(via, layer.size, "p2pd warm-up GET", out=str(body))
        fill_cpu = cpu_seconds(pid) - cpu0
        if sha256_file(body) != layer.digest:
            raise RuntimeError("p2pd served bytes that do not match the layer digest")
        body.unlink()
        served = daemon.metric("p2pd_blob_bytes_served_total", source="download")
        if served != layer.size:
            raise RuntimeError(f"warm-up was not a cache fill (served from download: {served})")
        checked_get(direct, layer.size, "direct warm-up GET")
        hwm_fill = kib(pid, "VmHWM")
        reset_ok = reset_peak_rss(pid)

        speed, cpu = interleaved_gets("(A)", urls, layer.size, repeat)
        hwm_serving = kib(pid, "VmHWM") if reset_ok else None
        hits = daemon.metric("p2pd_blob_bytes_served_total", source="cache")
        if hits != layer.size * repeat:
            raise RuntimeError(f"measured p2pd GETs were not all cache hits ({hits} bytes)")

        # (A2) the same once the cache has been idle for a while and read once more:
        # shows the steady state if p2pd treats freshly written pieces specially.
        settled: dict[str, Any] = {}
        if settle >= 0:
            say(f"(A2) idle {settle:g} s, then one untimed GET through p2pd")
            time.sleep(settle)
            checked_get(via, layer.size, "p2pd settle GET")
            s_speed, s_cpu = interleaved_gets("(A2)", urls, layer.size, repeat)
            sp, sd = median(s_speed["p2pd"]), median(s_speed["direct"])
            settled = {
                "settle_s": settle,
                "p2pd_mib_s": s_speed["p2pd"], "direct_mib_s": s_speed["direct"],
                "p2pd_median_mib_s": sp, "direct_median_mib_s": sd, "ratio": sp / sd,
                "p2pd_server_cpu_s": s_cpu["p2pd"], "registry_server_cpu_s": s_cpu["direct"],
            }
        describe = describe_pid(pid)
    p, d = median(speed["p2pd"]), median(speed["direct"])
    return {
        "blob_bytes": layer.size,
        "p2pd_mib_s": speed["p2pd"],
        "direct_mib_s": speed["direct"],
        "p2pd_median_mib_s": p,
        "direct_median_mib_s": d,
        "ratio": p / d,
        "p2pd_server_cpu_s": cpu["p2pd"],
        "registry_server_cpu_s": cpu["direct"],
        "fill_mib_s": fill.mib_s,
        "fill_cpu_s": fill_cpu,
        "p2pd_pid": describe,
        "log_level": level,
        "peak_rss_fill_kib": hwm_fill,
        "peak_rss_serving_kib": hwm_serving,
        "peak_rss_reset_supported": reset_ok,
        "settled": settled,
    }


# --------------------------------------------------------------------------- (B)


def bench_b(
    work: Path, registry: Registry, image: Image, ctd: Containerd, repeat: int,
) -> dict[str, Any]:
    ref = f"{registry.host}/{REPO_B}:{image.tag}"
    direct_hosts = write_direct_hosts(work / "hosts-direct", registry)

    def pull(hosts: Path, cpu: dict[str, float]) -> float:
        """Pull, check, remove; add the CPU seconds each party spent to ``cpu``."""
        c_ctd, c_reg = cpu_seconds(ctd.proc.pid), cpu_seconds(registry.proc.pid)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        ctd.pull(ref, hosts_dir=hosts, timeout=600)
        elapsed = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["containerd"] = cpu_seconds(ctd.proc.pid) - c_ctd
        cpu["ctr"] = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        cpu["registry"] = cpu_seconds(registry.proc.pid) - c_reg
        if ref not in ctd.image_refs() or not ctd.snapshot_keys():
            raise RuntimeError(f"pull of {ref} did not leave an unpacked image")
        ctd.remove_image(ref)
        return elapsed

    say("(B) warm-up: one untimed direct pull (binaries, page cache)")
    pull(direct_hosts, {})

    times: dict[str, list[float]] = {"p2pd": [], "direct": []}
    cpus: dict[str, list[dict[str, float]]] = {"p2pd": [], "direct": []}
    hwm: list[int] = []
    for rnd in range(repeat):
        order = ("p2pd", "direct") if rnd % 2 == 0 else ("direct", "p2pd")
        for which in order:
            cpu: dict[str, float] = {}
            if which == "direct":
                times["direct"].append(pull(direct_hosts, cpu))
            else:
                workdir = work / f"b{rnd}"
                with start_p2pd(workdir, registry) as daemon:
                    hosts = write_mirror_hosts(work / f"hosts-p2pd-{rnd}", registry, daemon.url)
                    c0 = cpu_seconds(daemon.proc.pid)
                    times["p2pd"].append(pull(hosts, cpu))
                    cpu["p2pd"] = cpu_seconds(daemon.proc.pid) - c0
                    hwm.append(kib(daemon.proc.pid, "VmHWM"))
                    served = daemon.metric("p2pd_blob_bytes_served_total", source="download")
                    if served != image.blob_bytes:
                        raise RuntimeError(
                            f"p2pd served {served} of {image.blob_bytes} blob bytes: "
                            "containerd fell back to the registry")
                shutil.rmtree(daemon.cache_dir, ignore_errors=True)  # keep the log
            cpus[which].append(cpu)
            spent = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            say(f"(B) round {rnd + 1}/{repeat} {which:6s}: {times[which][-1]:.3f} s "
                f"(CPU s: {spent})")
    p, d = median(times["p2pd"]), median(times["direct"])
    return {
        "image_bytes": image.blob_bytes,
        "layer_bytes": [layer.size for layer in image.layers],
        "p2pd_s": times["p2pd"],
        "direct_s": times["direct"],
        "p2pd_median_s": p,
        "direct_median_s": d,
        "ratio": p / d,
        "p2pd_cpu_s": [c["p2pd"] for c in cpus["p2pd"]],
        "cpu_s": cpus,
        "peak_rss_kib": hwm,
    }


# --------------------------------------------------------------------------- profile


@contextlib.contextmanager
def py_spy(pid: int, out: Path) -> Iterator[None]:
    """Record ``pid`` with py-spy (speedscope format) while the block runs."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy not found (pip install py-spy)")
    log = open(out.with_suffix(".log"), "wb")
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "speedscope", "--rate", "250",
         "--threads", "--nonblocking", "-o", str(out)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # let it attach
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy exited: {out.with_suffix('.log').read_text()}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def summarize_speedscope(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample counts per function, and samples per thread."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]

    def name(i: int) -> str:
        f = frames[i]
        file = f.get("file") or ""
        short = "/".join(file.split("/")[-2:]) if file else ""
        return f"{f['name']} ({short}:{f.get('line', '?')})" if short else f["name"]

    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for prof in doc["profiles"]:
        # py-spy names profiles 'Thread 123 "name"'; group threads by name only.
        thread = prof["name"].split(" ", 2)[-1].strip('"') or "(unnamed)"
        for stack in prof["samples"]:
            w = 1  # one sample each (weights are the sampling interval in seconds)
            total += w
            threads[thread] += w
            if stack:
                self_c[name(stack[-1])] += w
            for fn in {name(i) for i in stack}:
                incl[fn] += w
    return {
        "file": str(path),
        "samples": total,
        "threads": threads.most_common(),
        "self": self_c.most_common(top),
        "inclusive": incl.most_common(top * 2),
    }


def profile_phase(
    work: Path, out_dir: Path, registry: Registry, image_a: Image, image_b: Image,
    ctd: Containerd, rounds: int, settle: float,
) -> dict[str, Any]:
    """py-spy recordings (not measured): cached GETs right after the fill, the same after
    ``settle`` idle seconds and one more GET, and one cold ctr pull through a fresh p2pd."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    layer = image_a.layers[0]
    with start_p2pd(work / "profile-a", registry) as daemon:
        via = f"{daemon.url}/v2/{REPO_A}/blobs/{layer.digest}?ns={registry.host}"
        checked_get(via, layer.size, "profile fill GET")
        say(f"profile: py-spy on p2pd serving {rounds} cached GETs right after the fill")
        path = out_dir / "serve-fresh.speedscope.json"
        with py_spy(daemon.proc.pid, path):
            for _ in range(rounds):
                checked_get(via, layer.size, "profiled GET")
        result["serve_fresh"] = summarize_speedscope(path)
        time.sleep(max(settle, 0))
        checked_get(via, layer.size, "profile settle GET")
        say(f"profile: py-spy on p2pd serving {rounds} cached GETs after {settle:g} s idle")
        path = out_dir / "serve-settled.speedscope.json"
        with py_spy(daemon.proc.pid, path):
            for _ in range(rounds):
                checked_get(via, layer.size, "profiled GET")
        result["serve_settled"] = summarize_speedscope(path)

    say("profile: py-spy on a fresh p2pd during one cold ctr pull")
    ref = f"{registry.host}/{REPO_B}:{image_b.tag}"
    path = out_dir / "cold-pull.speedscope.json"
    with start_p2pd(work / "profile-b", registry) as daemon:
        hosts = write_mirror_hosts(work / "hosts-profile", registry, daemon.url)
        with py_spy(daemon.proc.pid, path):
            ctd.pull(ref, hosts_dir=hosts, timeout=600)
    ctd.remove_image(ref)
    result["cold_pull"] = summarize_speedscope(path)
    return result


# --------------------------------------------------------------------------- report


def report(res: Results) -> str:
    m, a, b = res.machine, res.a, res.b
    lines = [
        f"machine: nproc={m['nproc']}  {m['cpu']}  mem {m['mem_total_mib']} MiB",
        f"         {m['python']}  kernel {m['kernel']}  {m['ctr']}",
        f"         {m['curl']}",
        f"config:  size {res.config['size_mb']} MiB, repeat {res.config['repeat']}, "
        f"p2pd log level {a.get('log_level', '?')}, "
        + (f"(A) pinned: curl on CPU {res.config['pin']['curl']}, servers on "
           f"{res.config['pin']['servers']}" if "pin" in res.config else "(A) not pinned"),
        f"code:    {res.config.get('code')} = {res.config.get('p2pd_path')} "
        f"(tree sha256 {res.config.get('p2pd_tree_sha256')}, git HEAD "
        f"{res.config.get('git_head')}"
        + (f", ref {res.config['git_ref']}" if "git_ref" in res.config else "")
        + (", p2pd/ has uncommitted edits" if res.config.get("git_dirty_p2pd") else "")
        + ")",
        "",
        f"{'':44s} {'p2pd':>12s} {'direct':>12s} {'p2pd/direct':>12s} {'target':>8s}  ok",
    ]
    if a:
        ok = "yes" if a["ratio"] >= 1.0 else "NO"
        lines.append(
            f"{'(A) cached blob GET, median MiB/s':44s} {a['p2pd_median_mib_s']:12.1f} "
            f"{a['direct_median_mib_s']:12.1f} {a['ratio']:12.3f} {'>= 1.00':>8s}  {ok}")
    if a and a.get("settled"):
        s2 = a["settled"]
        ok = "yes" if s2["ratio"] >= 1.0 else "NO"
        label = f"(A2) same, after {s2['settle_s']:g} s idle + 1 GET, MiB/s"
        lines.append(
            f"{label:44s} "
            f"{s2['p2pd_median_mib_s']:12.1f} {s2['direct_median_mib_s']:12.1f} "
            f"{s2['ratio']:12.3f} {'(info)':>8s}  {ok}")
    if b:
        ok = "yes" if b["ratio"] <= 1.05 else "NO"
        lines.append(
            f"{'(B) cold ctr images pull, median s':44s} {b['p2pd_median_s']:12.3f} "
            f"{b['direct_median_s']:12.3f} {b['ratio']:12.3f} {'<= 1.05':>8s}  {ok}")
    lines.append("")
    if a:
        fmt = ", ".join
        lines += [
            f"(A) blob {a['blob_bytes'] / MiB:.1f} MiB; samples MiB/s  "
            f"p2pd [{fmt(f'{x:.1f}' for x in a['p2pd_mib_s'])}]  "
            f"direct [{fmt(f'{x:.1f}' for x in a['direct_mib_s'])}]",
            f"    server CPU s per GET  p2pd [{fmt(f'{x:.2f}' for x in a['p2pd_server_cpu_s'])}]"
            f"  registry [{fmt(f'{x:.2f}' for x in a['registry_server_cpu_s'])}]",
            f"    cache-filling warm-up GET: {a['fill_mib_s']:.1f} MiB/s, p2pd CPU "
            f"{a['fill_cpu_s']:.2f} s",
        ]
        if a.get("settled"):
            s2 = a["settled"]
            lines += [
                f"(A2) samples MiB/s  p2pd [{fmt(f'{x:.1f}' for x in s2['p2pd_mib_s'])}]  "
                f"direct [{fmt(f'{x:.1f}' for x in s2['direct_mib_s'])}]",
                f"    server CPU s per GET  p2pd "
                f"[{fmt(f'{x:.2f}' for x in s2['p2pd_server_cpu_s'])}]  registry "
                f"[{fmt(f'{x:.2f}' for x in s2['registry_server_cpu_s'])}]",
            ]
        serving = a["peak_rss_serving_kib"]
        lines.append(
            f"    p2pd peak RSS (VmHWM): {a['peak_rss_fill_kib'] / 1024:.1f} MiB after the "
            f"cache fill; " + (f"{serving / 1024:.1f} MiB while serving cached (peak reset "
                               "after warm-up)" if serving else "peak reset unsupported"))
        pid = a["p2pd_pid"]
        kind = "python" if pid["is_python"] else "NOT python"
        lines.append(
            f"    measured pid {pid['pid']} = {pid['exe']} ({kind}), "
            f"{pid['threads']} threads, child processes: {pid['child_pids'] or 'none'}")
    if b:
        fmt = ", ".join
        lines += [
            f"(B) layers {'/'.join(f'{x / MiB:.1f}' for x in b['layer_bytes'])} MiB; "
            f"samples s  p2pd [{fmt(f'{x:.3f}' for x in b['p2pd_s'])}]  "
            f"direct [{fmt(f'{x:.3f}' for x in b['direct_s'])}]",
            f"    p2pd CPU s per pull [{fmt(f'{x:.2f}' for x in b['p2pd_cpu_s'])}]",
            *(f"    median CPU s per {which} pull: " + ", ".join(
                f"{k} {median([c[k] for c in b['cpu_s'][which]]):.2f}"
                for k in b["cpu_s"][which][0])
              + f"  (total {median([sum(c.values()) for c in b['cpu_s'][which]]):.2f}"
              f" on {m['nproc']} CPUs)"
              for which in ("direct", "p2pd")),
            f"    p2pd peak RSS (VmHWM) per fresh daemon, MiB "
            f"[{fmt(f'{x / 1024:.1f}' for x in b['peak_rss_kib'])}]  max "
            f"{max(b['peak_rss_kib']) / 1024:.1f}",
        ]
    for key, prof in res.profile.items():
        lines += ["", f"profile {key}: {prof['samples']} samples (py-spy), {prof['file']}",
                  "  threads: " + ", ".join(f"{n} {c}" for n, c in prof["threads"]),
                  "  self time:"]
        total = max(prof["samples"], 1)
        lines += [f"    {100 * c / total:5.1f}%  {fn}" for fn, c in prof["self"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global CURL_CPUS, SERVER_CPUS
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_mirror",
        description="p2pd mirror vs direct registry: cached blob GET throughput (A) and "
        "cold ctr pull time (B), side by side.")
    parser.add_argument("--size-mb", type=float, default=200,
                        help="MiB of layer data: the single layer of (A) and the total of (B)")
    parser.add_argument("--repeat", type=int, default=3, help="measured rounds of each")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary work dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--only", choices=("a", "b"), help="run only (A) or only (B)")
    parser.add_argument("--code", default="worktree", metavar="WHICH",
                        help="p2pd code the daemons run: 'worktree' (a copy of p2pd/ taken "
                        "at start, default), 'live' (the repository as is) or a git "
                        "revision such as HEAD, or a directory holding a p2pd package (copied)")
    parser.add_argument("--settle", type=float, default=3.0, metavar="SECONDS",
                        help="idle time before the (A2) rounds (default 3; negative: skip A2)")
    parser.add_argument("--pin", action="store_true",
                        help="in (A), run curl on the last CPU and the servers on the others "
                        "(steadier numbers; the default lets the scheduler place them)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="afterwards, record p2pd with py-spy into DIR (not measured)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0:
        parser.error("--repeat must be >= 1 and --size-mb > 0")
    missing = missing_bins(*REQUIRED)
    if missing:
        print(f"missing executables: {', '.join(missing)}", file=sys.stderr)
        return 2

    res = Results(machine=machine_info(),
                  config={"size_mb": args.size_mb, "repeat": args.repeat})
    size = int(args.size_mb * MiB)
    if args.json:
        args.json = args.json.resolve()
    if args.profile:
        args.profile = args.profile.resolve()
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(prefix="p2pd-bench-", dir=args.workdir)).resolve()
    say(f"work dir {work}")
    try:
        res.config.update(prepare_code(args.code, work))
        say(f"p2pd code: {res.config['code']} {res.config['p2pd_path']} "
            f"(tree {res.config['p2pd_tree_sha256']})")
        with contextlib.ExitStack() as stack:
            registry = stack.enter_context(Registry.start(work / "registry"))
            images: dict[str, Image] = {}
            if args.only != "b" or args.profile:
                say(f"building + pushing (A) image: 1 layer of {size / MiB:.0f} MiB")
                images["a"] = build_image(work / "img-a", [size], seed=101)
                push_image(images["a"], registry.host, REPO_A)
                shutil.rmtree(work / "img-a")
            if args.only != "a" or args.profile:
                sizes = [int(size * f) for f in B_SPLIT]
                say(f"building + pushing (B) image: layers "
                    f"{'/'.join(f'{s / MiB:.0f}' for s in sizes)} MiB")
                images["b"] = build_image(work / "img-b", sizes, seed=202)
                push_image(images["b"], registry.host, REPO_B)
                shutil.rmtree(work / "img-b")
            ctd = stack.enter_context(Containerd.start(work / "containerd"))

            if args.only != "b":
                all_cpus = os.sched_getaffinity(0)
                if args.pin and len(all_cpus) >= 2:
                    CURL_CPUS = {max(all_cpus)}
                    SERVER_CPUS = all_cpus - CURL_CPUS
                    res.config["pin"] = {"curl": sorted(CURL_CPUS),
                                         "servers": sorted(SERVER_CPUS)}
                try:
                    res.a = bench_a(work, registry, images["a"], args.repeat, args.settle)
                finally:
                    if SERVER_CPUS:
                        set_affinity(registry.proc.pid, all_cpus)
                    CURL_CPUS = SERVER_CPUS = None
            if args.only != "a":
                res.b = bench_b(work, registry, images["b"], ctd, args.repeat)
            if args.profile:
                res.profile = profile_phase(work, args.profile, registry, images["a"],
                                            images["b"], ctd, max(3, args.repeat),
                                            args.settle)
    finally:
        os.chdir(cwd)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            if work.exists():
                say(f"could not remove all of {work}")
    text = report(res)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(asdict(res), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
