#!/usr/bin/env bash
# README command 2: set everything up, then run the checks and the whole default test
# suite (unit, daemon, and end-to-end tests with the real docker-registry, containerd and
# skopeo). Slow emulation runs are marked `slow` and left out; run them with -m slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check p2pd tests simulations benchmarks
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
