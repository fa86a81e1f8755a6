"""Two checkouts of the simulation, the same run, at the same time: one core each.

Why: this machine's speed drifts by a quarter within minutes, so two builds run one
after the other measure the drift as much as the code. Run at once, one per core, both
see the same machine; swapping the cores every round cancels what differs between the
two cores. A round's ratio is the new checkout's wall time over the old one's.

Each side runs the whole run in one process: split runs (``--partitions 2``, the
default) run their partitions one after the other (``processes=False``: the same
windows and messages, the same result), so each side needs one core. Both sides run on
glibc's allocator with huge pages, as ``python -m simulations run`` does. The results
(events, p50, the sum of the pull times) must be equal within a round, or the two
checkouts do not simulate the same thing; the script says so.

Usage (each checkout built first: ``python -m simulations build`` in it)::

    git worktree add /tmp/old <commit>
    (cd /tmp/old && ../main/.venv/bin/python -m simulations build)
    .venv/bin/python -m benchmarks.sim_side_by_side /tmp/old . --nodes 3000 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from simulations import hugepages

_CHILD = r"""
import json, os, sys, time
checkout = sys.argv[1]
core, nodes, partitions = (int(arg) for arg in sys.argv[2:5])
os.sched_setaffinity(0, {core})
sys.path.insert(0, checkout)
from simulations import compiled
compiled.activate()
from simulations import parallel
from simulations.cluster import Scenario, run_p2p
from simulations.node import Limits
MB = 1 << 20
scenario = Scenario(nodes=nodes, image_bytes=round(953.67 * MB), node_up=1192 * MB,
                    node_down=1192 * MB, registry_up=1192 * MB, layers=4, seed=1,
                    partitions=partitions, limits=Limits(piece_size=4 * MB))
start = time.perf_counter()
result = (run_p2p(scenario) if partitions == 1
          else parallel.run_partitioned(scenario, processes=False))
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "events": result.events, "p50": result.percentile(0.5),
                  "sum": sum(result.completion), "build": compiled.in_use()}))
"""


def _start(checkout: Path, core: int, nodes: int, partitions: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(checkout.resolve()), str(core), str(nodes),
         str(partitions)],
        env=hugepages.environment(dict(os.environ)), stdout=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the checkout to compare against")
    parser.add_argument("new", type=Path, help="the checkout measured")
    parser.add_argument("--nodes", type=int, default=3000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.error("needs two cores")
    ratios = []
    for round_ in range(args.rounds):
        first, second = (cores[0], cores[1]) if round_ % 2 == 0 else (cores[1], cores[0])
        old = _start(args.old, first, args.nodes, args.partitions)
        new = _start(args.new, second, args.nodes, args.partitions)
        outputs = [proc.communicate()[0] for proc in (old, new)]
        if old.returncode or new.returncode:
            print(f"a side failed (exit {old.returncode}, {new.returncode})", file=sys.stderr)
            return 1
        a, b = (json.loads(out) for out in outputs)
        if (a["events"], a["p50"], a["sum"]) != (b["events"], b["p50"], b["sum"]):
            print(f"round {round_ + 1}: the results differ: {a} against {b}", file=sys.stderr)
            return 1
        if a["build"] != "compiled" or b["build"] != "compiled":
            print(f"note: old {a['build']}, new {b['build']}", file=sys.stderr)
        ratios.append(b["wall"] / a["wall"])
        print(f"round {round_ + 1}: old {a['wall']:.2f} s (core {first}), new "
              f"{b['wall']:.2f} s (core {second}): {ratios[-1]:.3f}; {a['events']} events, "
              f"p50 {a['p50']!r}", flush=True)
    print(f"new/old: mean {statistics.fmean(ratios):.3f}, "
          f"from {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
