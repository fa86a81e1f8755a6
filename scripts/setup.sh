#!/usr/bin/env bash
# Installs everything p2pd's demo and tests need on a Debian 12 machine (as root):
# the real components (docker-registry, containerd, skopeo, htpasswd, iproute2, curl)
# from Debian, a C compiler and Python's headers for the simulation's compiled build, and
# p2pd with its test tools into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# The venv's interpreter: Debian's own python3 when there is one (built with
# profile-guided and link-time optimisation: the simulation ran about 6 % faster on it
# than on a python3.11 built from source without them, e.g. by pyenv, which may come
# first in PATH), else the python3 in PATH.
PY=python3
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY=/usr/bin/python3
fi

need_apt=()
for pair in docker-registry:docker-registry containerd:containerd ctr:containerd \
            skopeo:skopeo htpasswd:apache2-utils ip:iproute2 curl:curl gcc:gcc; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need_apt+=(python3-venv python3-pip)
fi
if ! "$PY" -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    need_apt+=(python3-dev)  # headers for `python -m simulations build` (mypyc)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.p2pd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing p2pd and its test tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
