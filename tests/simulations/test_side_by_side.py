"""benchmarks/sim_side_by_side: two checkouts at once, and a refusal to compare two that
do not simulate the same thing."""

import os
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import sim_side_by_side
from simulations import compiled

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")


@pytest.fixture(autouse=True)
def _no_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an empty build cache: both sides run interpreted (quick at this size, and alike)
    monkeypatch.setenv("P2PD_SIM_CACHE", str(tmp_path / "cache"))


def test_the_same_checkout_twice_gives_two_rounds_and_their_mean(
        capsys: pytest.CaptureFixture[str]) -> None:
    root = str(compiled.ROOT)
    assert sim_side_by_side.main([root, root, "--nodes", "12", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 1: old" in out and "round 2: old" in out
    assert len(set(re.findall(r"\(core (\d+)\)", out))) == 2  # each side on its own core
    assert "new/old: mean" in out


def test_checkouts_that_simulate_differently_are_not_compared(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    for package in ("p2pd", "simulations"):
        shutil.copytree(compiled.ROOT / package, other / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    tuning = other / "p2pd" / "core" / "tuning.py"
    text = tuning.read_text()
    assert "LOOKUP_INTERVAL: Final = 0.25" in text
    tuning.write_text(text.replace("LOOKUP_INTERVAL: Final = 0.25",
                                   "LOOKUP_INTERVAL: Final = 0.05"))
    root = str(compiled.ROOT)
    assert sim_side_by_side.main([root, str(other), "--nodes", "12", "--rounds", "1"]) == 1
    assert "the results differ" in capsys.readouterr().err
