"""Runs on transparent huge pages: the same results, and only when asked or possible."""

import json
import os
import subprocess
import sys

from simulations import compiled, hugepages

SCENARIO = ["run", "--modes", "p2p,direct", "--nodes", "12", "--image-mb", "24",
            "--layers", "2", "--node-up", "20", "--node-down", "40", "--registry", "30",
            "--seed", "5", "--json"]


def _simulate(**extra: str) -> dict[str, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
    env.update(P2PD_SIM_COMPILED="0", **extra)
    done = subprocess.run([sys.executable, "-m", "simulations", *SCENARIO], env=env,
                          cwd=compiled.ROOT, capture_output=True, text=True, timeout=300,
                          check=True)
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def test_a_run_on_huge_pages_is_the_same_run() -> None:
    plain = _simulate(P2PD_SIM_HUGEPAGES="0")
    huge = _simulate()
    assert {r["memory"] for r in plain.values()} == {"default"}
    # restarted with glibc's malloc and its tunable, where glibc and the kernel can
    expected = "huge pages" if hugepages.available() else "default"
    assert {r["memory"] for r in huge.values()} == {expected}
    for mode in ("p2p", "direct"):
        a, b = plain[mode], huge[mode]
        for key in ("wall", "memory"):
            del a[key], b[key]
        assert a == b  # every figure: events, times, bytes, counters
    assert plain["p2p"]["events"] > 1000


def test_the_environment_adds_the_tunable_once_and_keeps_others() -> None:
    env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["PYTHONMALLOC"] == "malloc" and env["X"] == "1"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.environment(env) == env
    assert hugepages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_an_allocator_the_user_chose_is_kept() -> None:
    chosen = _simulate(PYTHONMALLOC="pymalloc_debug")
    assert {r["memory"] for r in chosen.values()} == {"default"}
