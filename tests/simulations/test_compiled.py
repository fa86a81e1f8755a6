"""The compiled build: the same results as the .py files, and only for the sources it was
made from."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulations import compiled

SCENARIO = ["run", "--modes", "p2p,direct", "--nodes", "24", "--image-mb", "40",
            "--layers", "3", "--node-up", "20", "--node-down", "40", "--registry", "30",
            "--failures", "2", "--fail-at", "0.5", "--seed", "3", "--json"]


def _simulate(cache: Path, *, use_build: bool) -> dict[str, dict[str, object]]:
    env = {**os.environ, "P2PD_SIM_CACHE": str(cache),
           "P2PD_SIM_COMPILED": "1" if use_build else "0"}
    done = subprocess.run([sys.executable, "-m", "simulations", *SCENARIO], env=env,
                          cwd=compiled.ROOT, capture_output=True, text=True, timeout=300,
                          check=True)
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (scripts/setup.sh "
                    "installs gcc)")
def test_a_compiled_run_is_the_interpreted_run(tmp_path: Path) -> None:
    env = {**os.environ, "P2PD_SIM_CACHE": str(tmp_path)}
    built = subprocess.run([sys.executable, "-m", "simulations", "build"], env=env,
                           cwd=compiled.ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    build = tmp_path / compiled.source_key()
    for path in compiled.MODULES:  # one extension module per compiled module
        assert len(list((build / Path(path).parent).glob(f"{Path(path).stem}.*.so"))) == 1
    again = subprocess.run([sys.executable, "-m", "simulations", "build"], env=env,
                           cwd=compiled.ROOT, capture_output=True, text=True, timeout=60)
    assert "up to date" in again.stdout

    fast = _simulate(tmp_path, use_build=True)
    slow = _simulate(tmp_path, use_build=False)
    assert {r["build"] for r in fast.values()} == {"compiled"}  # the .so files ran
    assert {r["build"] for r in slow.values()} == {"interpreted"}
    for mode in ("p2p", "direct"):
        a, b = fast[mode], slow[mode]
        for key in ("wall", "build"):
            del a[key], b[key]
        assert a == b  # every figure, to the last bit: events, times, bytes, counters
    assert fast["p2p"]["failed"] == 2 and fast["p2p"]["events"] > 1000


def _copy_sources(root: Path) -> None:
    for path in compiled.MODULES:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(compiled.ROOT / path, root / path)


def test_a_build_belongs_to_the_sources_it_was_made_from(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PD_SIM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "src"
    _copy_sources(root)
    assert compiled.source_key(root) == compiled.source_key()
    (compiled.build_dir(root)).mkdir(parents=True)
    assert not compiled.is_built(root)  # incomplete: no manifest yet
    (compiled.build_dir(root) / "MODULES").write_text("")
    assert compiled.is_built(root)
    scheduler = root / "p2pd/core/scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\n# edited\n")
    assert compiled.source_key(root) != compiled.source_key()
    assert not compiled.is_built(root)  # the old build is not used for the new source
    assert compiled.activate(root) is None


def test_in_use_reports_what_is_loaded() -> None:
    import simulations.node  # noqa: F401  (loaded from the .py files in this process)

    assert compiled.in_use() == "interpreted"
    assert compiled.module_name("p2pd/core/scheduler.py") == "p2pd.core.scheduler"
