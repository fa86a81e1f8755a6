"""Running studies and writing what they found: JSON, Markdown tables, PNG plots.

:func:`run_study` runs every case of a :class:`~simulations.scenarios.Study` in each of
its modes and returns one row per (case, mode). :func:`study_table` lays the rows out
beside the published figures. The plots (matplotlib, headless ``Agg`` backend):
:func:`plot_cdf` (per-node pull times), :func:`plot_sweep` (time until all are done
against N, published points beside simulated ones) and :func:`plot_egress` (cumulative
registry egress over time).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from simulations.cluster import Progress, Result, Scenario, run_direct, run_p2p, run_spegel
from simulations.scenarios import Study

RUNNERS: dict[str, Callable[[Scenario], Result]] = {
    "p2p": run_p2p, "direct": run_direct, "spegel": run_spegel,
}
RESULTS_DIR = Path(__file__).parent / "results"


def run_modes(scenario: Scenario, modes: Sequence[str],
              log: Callable[[str], None] = lambda line: None,
              progress: Callable[[Progress], None] | None = None) -> dict[str, Result]:
    """``scenario`` in each of ``modes`` (same network, same seed); ``progress`` hears
    how a long p2p run is getting on (see ``Cluster.run``)."""
    out = {}
    for mode in modes:
        out[mode] = run_p2p(scenario, progress) if mode == "p2p" else RUNNERS[mode](scenario)
        log(f"  {mode}: done in {out[mode].wall:.1f} s wall")
    return out


Summaries = dict[str, dict[str, Any]]  # mode -> Result.summary()

# What the worker processes of run_many run: set before they are forked, read by them
_JOBS: tuple[Sequence[Scenario], Sequence[str], Callable[[str], None],
             Callable[[Progress], None] | None] | None = None


def _summarize(scenario: Scenario, modes: Sequence[str], log: Callable[[str], None],
               progress: Callable[[Progress], None] | None) -> Summaries:
    results = run_modes(scenario, modes, log, progress)
    return {mode: result.summary() for mode, result in results.items()}


def _summaries(index: int) -> Summaries:
    assert _JOBS is not None
    scenarios, modes, log, progress = _JOBS
    summaries = _summarize(scenarios[index], modes, log, progress)
    sys.stdout.flush()  # the pool ends its workers without flushing their buffers
    sys.stderr.flush()
    return summaries


def run_many(scenarios: Sequence[Scenario], modes: Sequence[str], jobs: int = 1,
             log: Callable[[str], None] = lambda line: None,
             progress: Callable[[Progress], None] | None = None,
             ) -> Generator[Summaries, None, None]:
    """Each scenario in each of ``modes``: the results' summaries, in order.

    ``jobs`` > 1 runs that many scenarios at once, each in a process forked from this one
    (a run is one core's work, and independent of the others; its figures are the same
    either way, only the wall time each reports is measured beside the others). The
    largest (nodes times bytes) start first, so that the longest run does not start last;
    the summaries come in order, each as soon as it and those before it are done."""
    global _JOBS
    jobs = max(1, min(jobs, len(scenarios)))
    if jobs == 1 or "fork" not in multiprocessing.get_all_start_methods():
        for scenario in scenarios:
            yield _summarize(scenario, modes, log, progress)
        return
    _JOBS = (scenarios, modes, log, progress)
    sys.stdout.flush()  # or each worker would write what this process had buffered
    sys.stderr.flush()
    largest_first = sorted(range(len(scenarios)),
                           key=lambda i: -scenarios[i].nodes * scenarios[i].image_bytes)
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            pending = {i: pool.apply_async(_summaries, (i,)) for i in largest_first}
            for i in range(len(scenarios)):
                yield pending[i].get()
    finally:
        _JOBS = None


def default_jobs() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def run_study(study: Study, log: Callable[[str], None] = lambda line: None,
              done: Callable[[list[dict[str, Any]]], object] = lambda rows: None,
              progress: Callable[[Progress], None] | None = None, jobs: int = 1,
              ) -> list[dict[str, Any]]:
    """Every case in every mode: one row each (JSON-ready), with the published figures.
    ``done`` gets the rows so far after each case (to save a long study as it goes);
    ``jobs`` cases run at once (see :func:`run_many`)."""
    rows: list[dict[str, Any]] = []
    jobs = max(1, min(jobs, len(study.cases)))
    if jobs > 1:
        log(f"{study.name}: {len(study.cases)} cases, up to {jobs} at once")
    runs = run_many([case.scenario for case in study.cases], study.modes, jobs, log,
                    progress)
    for case in study.cases:
        if jobs <= 1:
            log(f"{study.name}: {case.label}")
        summaries = next(runs)
        if jobs > 1:
            log(f"{study.name}: {case.label} done")
        for mode, summary in summaries.items():
            rows.append({"case": case.label, "mode": mode, "published": case.published,
                         "nodes": case.scenario.nodes, **summary})
        done(rows)
    runs.close()
    return rows


def _s(seconds: float) -> str:
    if seconds >= 600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


def study_table(study: Study, rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: per case and mode, the published figure and the simulated ones."""
    lines = [
        "| case | mode | published | simulated p50 | p99 | all done | Kumar-Ross bound "
        "| registry egress | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        published = row["published"]
        if row["mode"] in published:
            shown = published[row["mode"]]
        elif row["mode"] == "p2p" and not any(m in published for m in ("direct", "spegel")):
            shown = ", ".join(f"{k} {v}" for k, v in published.items())
        else:
            shown = ""
        lines.append(
            f"| {row['case']} | {row['mode']} | {shown} | {_s(row['p50'])} | "
            f"{_s(row['p99'])} | {_s(row['max'])} | {_s(row['bound'])} | "
            f"{row['registry_copies']:.2f} x image | {row['wall']:.0f} s |")
    return "\n".join(lines)


def save_study(study: Study, rows: Sequence[dict[str, Any]], directory: Path) -> Path:
    """Write ``NAME.json`` (rows, assumptions, source) and ``NAME.md`` (the table)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{study.name}.json"
    path.write_text(json.dumps({"study": study.name, "title": study.title,
                                "source": study.source, "assumptions": study.assumptions,
                                "rows": rows}, indent=1, sort_keys=True) + "\n")
    notes = "\n".join(f"- {a}" for a in study.assumptions)
    (directory / f"{study.name}.md").write_text(
        f"### {study.title}\n\nSource: {study.source}\n\nAssumptions:\n{notes}\n\n"
        f"{study_table(study, rows)}\n")
    return path


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str, *, log_y: bool = False,
            grid: Literal["major", "minor", "both"] = "major") -> Iterator[Any]:
    """Axes to draw on (log x: p2p and direct differ by orders of magnitude); on leaving,
    labelled and saved to ``path`` as PNG (matplotlib's headless backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        yield ax
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which=grid)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_cdf(results: dict[str, Result], path: Path, title: str) -> None:
    """Per-node pull time CDF for each labelled result."""
    with _figure(path, title, "pull time per node (s, log scale)",
                 "fraction of nodes done") as ax:
        for label, result in results.items():
            times = result.completion
            n = len(times)
            ax.step(times, [(i + 1) / n for i in range(n)], where="post", label=label)


def _densify(series: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``series`` with points added along its straight stretches (for log axes)."""
    out: list[tuple[float, float]] = []
    for (t0, b0), (t1, b1) in pairwise(series):
        out.append((t0, b0))
        if t0 > 0 and t1 > t0 * 1.05:  # geometric steps: even on a log axis
            times = [t0 * (t1 / t0) ** (k / 40) for k in range(1, 40)]
        elif t0 <= 0 < t1:
            times = [t1 * k / 40 for k in range(1, 40)]
        else:
            continue
        out.extend((t, b0 + (b1 - b0) * (t - t0) / (t1 - t0)) for t in times)
    out.extend(series[-1:])
    return out


def plot_egress(results: dict[str, Result], path: Path, title: str) -> None:
    """Cumulative registry egress (in images) over time for each labelled result."""
    with _figure(path, title, "time (s, log scale)",
                 "registry egress so far (copies of the image, log scale)",
                 log_y=True) as ax:
        for label, result in results.items():
            points = [(t, b / result.image_bytes)
                      for t, b in _densify(result.registry_series) if t > 0 and b > 0]
            ax.plot([t for t, _ in points], [b for _, b in points], label=label,
                    linestyle="--" if label == "spegel" else "-")


def _seconds(published: str) -> float | None:
    number, _, unit = published.partition(" ")
    try:
        value = float(number)
    except ValueError:
        return None
    return value * 60 if unit.startswith("min") else value if unit == "s" else None


def study_sweeps(rows: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Time until all are done against N per image size and mode, simulated and (where a
    number was published) published: the series of :func:`plot_sweep`."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        size = f"{row['image_bytes'] / 1e6:.0f} MB"
        series.setdefault(f"{size} {row['mode']} simulated", []).append(
            (row["nodes"], row["max"]))
        published = _seconds(row["published"].get(row["mode"], ""))
        if published is not None:
            series.setdefault(f"published {size} {row['mode']}", []).append(
                (row["nodes"], published))
    return series


def plot_sweep(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Time until every node is done against N, one line per label (log-log)."""
    with _figure(path, title, "nodes", "time until every node is done (s)", log_y=True,
                 grid="both") as ax:
        for label, points in series.items():
            xs, ys = zip(*sorted(points), strict=True)
            style = "--" if label.startswith("published") else "-"
            ax.plot(xs, ys, style, marker="o", label=label)
