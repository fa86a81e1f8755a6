#!/usr/bin/env bash
# README command 1: set everything up, then pull a generated image through p2pd with a
# real containerd and report where the bytes came from.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/p2pd demo "$@"
