"""Simulation runs on transparent huge pages: the same events, less time waiting on memory.

Why: a 10,000-node run holds about a gigabyte of small objects (schedulers, flows,
timers, dicts), and each event touches a few of them, anywhere in it. With 4 KiB pages
nearly every such touch also misses the TLB; a native profile of the compiled build puts
a third of the time on the first touch of an object (``Py_DECREF``'s self time).
CPython's own allocator takes memory in 1 MiB arenas and never asks for huge pages, so
with the kernel's usual ``madvise`` setting it gets 4 KiB ones. glibc's ``malloc`` asks
for them when told to (the tunable ``glibc.malloc.hugetlb=1``, glibc 2.35 and later) on
a kernel whose transparent huge pages are ``always`` or ``madvise``.

How: ``python -m simulations run`` and ``sweep`` call :func:`reexec` before anything
else. Unless the process already runs so, ``P2PD_SIM_HUGEPAGES=0`` is set,
``PYTHONMALLOC`` names another allocator, or the machine cannot (not glibc 2.35+, or
transparent huge pages ``never``), it runs itself again (``os.execve``) with
``PYTHONMALLOC=malloc`` and the tunable added to ``GLIBC_TUNABLES``. Nothing the
simulation computes depends on where objects live (a test compares a run with and
without), so only the wall time changes. A run's result says which it had (``memory``:
:func:`in_use`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_TUNABLE = "glibc.malloc.hugetlb=1"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def in_use() -> str:
    """``"huge pages"`` if this process allocates with glibc's malloc on transparent
    huge pages, else ``"default"``."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    on = os.environ.get("PYTHONMALLOC") == "malloc" and _TUNABLE in tunables
    return "huge pages" if on else "default"


def available() -> bool:
    """Whether glibc (2.35+) and the kernel (transparent huge pages not ``never``) can."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        major, minor = (int(part) for part in version.split(".")[:2])
        mode = _THP.read_text()
    except (AttributeError, ValueError, OSError):
        return False
    return name == "glibc" and (major, minor) >= (2, 35) and "[never]" not in mode


def environment(base: dict[str, str]) -> dict[str, str]:
    """``base`` with glibc's malloc and its huge-page tunable switched on."""
    tunables = [t for t in base.get("GLIBC_TUNABLES", "").split(":") if t]
    if _TUNABLE not in tunables:
        tunables.append(_TUNABLE)
    return {**base, "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": ":".join(tunables)}


def reexec() -> None:
    """Run this command again, interpreter options and all, on huge pages, if it is not
    yet and can (see the module docstring); otherwise return."""
    if in_use() == "huge pages" or os.environ.get("P2PD_SIM_HUGEPAGES") == "0":
        return
    if os.environ.get("PYTHONMALLOC", "malloc") != "malloc":
        return  # the user chose another allocator (debug hooks, say)
    if not available():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment(dict(os.environ)))
