"""A compiled build of the simulation's hot modules: the same source, about twice as fast.

Why: a large run spends all its time in the daemon's scheduler and coordinator and in
the simulation's event loop, network model and node loop — pure Python. mypyc (it ships
with mypy, which the project's type checks already use) compiles exactly those source
files, typed under ``mypy --strict`` already, to C extension modules. The simulation
then runs the same code, event for event, with the same floating-point results; only
the wall time changes (a test compares a compiled and an interpreted run field by
field).

How it works: :func:`build` copies ``p2pd/core`` and the ``simulations`` sources to a
scratch directory, runs mypyc there on :data:`MODULES` and keeps only the extension
modules, in ``<cache>/<key>/``. ``key`` hashes the Python version, mypy's version and
the bytes of every file in :data:`MODULES`, so a build is only ever used for the source
it was made from: edit the scheduler and the old build is simply not found.
:func:`activate` (``python -m simulations`` calls it before it imports the simulation)
puts the build's directories in front of the ``p2pd.core`` and ``simulations`` package
paths, so those modules load from it and everything else from the checkout.
``<cache>`` is ``$P2PD_SIM_CACHE``, else ``$XDG_CACHE_HOME/p2pd/simulations``, else
``~/.cache/p2pd/simulations``. ``P2PD_SIM_COMPILED=0`` runs interpreted even when built.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "p2pd/core/tuning.py",
    "p2pd/core/draws.py",
    "p2pd/core/pieces.py",
    "p2pd/core/bitfield.py",
    "p2pd/core/peerscore.py",
    "p2pd/core/scheduler.py",
    "p2pd/core/membership.py",
    "p2pd/core/coordinator.py",
    "simulations/engine.py",
    "simulations/network.py",
    "simulations/node.py",
    "simulations/cluster.py",
)
"""The modules compiled: what the hot loop of a run executes (paths from the checkout)."""
# copied beside them for mypyc to type-check against: the rest of the two packages
_SUPPORT = ("p2pd/__init__.py", "p2pd/core/*.py", "simulations/*.py")
_DONE = "MODULES"  # written last: a build directory without it is incomplete


class BuildError(RuntimeError):
    """mypyc or the C compiler failed (the message has their output's tail)."""


def module_name(path: str) -> str:
    """``p2pd/core/scheduler.py`` -> ``p2pd.core.scheduler``."""
    return path.removesuffix(".py").replace("/", ".")


def source_key(root: Path = ROOT) -> str:
    """What a build is made from: Python's and mypy's versions and the modules' bytes."""
    digest = hashlib.sha256()
    digest.update(f"{sys.implementation.cache_tag} {_mypy_version()}\n".encode())
    for path in MODULES:
        data = (root / path).read_bytes()
        digest.update(f"{path} {len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()[:20]


def cache_root() -> Path:
    """Where builds are kept (see the module docstring)."""
    explicit = os.environ.get("P2PD_SIM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "p2pd" / "simulations"


def build_dir(root: Path = ROOT) -> Path:
    """The directory of the build for the current sources (it may not exist)."""
    return cache_root() / source_key(root)


def is_built(root: Path = ROOT) -> bool:
    """Whether a complete build for the current sources exists."""
    return (build_dir(root) / _DONE).is_file()


def build(log: Callable[[str], None] = print, root: Path = ROOT) -> Path:
    """Compile :data:`MODULES` (unless already built for these sources); the build's
    directory. Raises :class:`BuildError` if mypyc or the C compiler fails."""
    target = build_dir(root)
    if (target / _DONE).is_file():
        log(f"up to date: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"compiling {len(MODULES)} modules with mypyc (about half a minute) ...")
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as scratch:
        work = Path(scratch) / "src"
        for pattern in _SUPPORT:
            for source in root.glob(pattern):
                path = source.relative_to(root)
                (work / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, work / path)
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", *MODULES], cwd=work, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = "\n".join(done.stdout.splitlines()[-25:])
            raise BuildError(f"mypyc failed (exit {done.returncode}):\n{tail}")
        staged = Path(scratch) / "out"
        for lib in work.glob("*__mypyc*.so"):  # the code of every module, shared
            (staged / "lib").mkdir(parents=True, exist_ok=True)
            shutil.move(lib, staged / "lib" / lib.name)
        for module in MODULES:
            package = Path(module).parent
            found = list((work / package).glob(f"{Path(module).stem}.*.so"))
            if len(found) != 1:
                raise BuildError(f"mypyc left no extension module for {module}")
            (staged / package).mkdir(parents=True, exist_ok=True)
            shutil.move(found[0], staged / package / found[0].name)
        (staged / _DONE).write_text("\n".join(MODULES) + "\n")
        try:
            staged.rename(target)
        except OSError:  # another build got there first
            if not (target / _DONE).is_file():
                raise
    log(f"built: {target}")
    return target


def activate(root: Path = ROOT) -> Path | None:
    """Load :data:`MODULES` from the build for the current sources, if there is one;
    its directory, or ``None`` (nothing changes). Call it before they are imported."""
    if os.environ.get("P2PD_SIM_COMPILED", "1") == "0":
        return None
    target = build_dir(root)  # hashes the sources: once per start, not once per question
    if not (target / _DONE).is_file():
        return None
    loaded = [name for name in map(module_name, MODULES) if name in sys.modules]
    if loaded:
        raise RuntimeError(f"activate() after {loaded[0]} was imported")
    import p2pd.core
    import simulations

    sys.path.insert(0, str(target / "lib"))
    p2pd.core.__path__.insert(0, str(target / "p2pd" / "core"))
    simulations.__path__.insert(0, str(target / "simulations"))
    return target


def in_use() -> str:
    """``"compiled"`` if every loaded module of :data:`MODULES` is an extension module
    (what the running simulation executes, not what was asked for), else ``"interpreted"``."""
    files = [getattr(sys.modules.get(module_name(p)), "__file__", None) or "" for p in MODULES]
    loaded = [f for f in files if f]
    return "compiled" if loaded and all(f.endswith(".so") for f in loaded) else "interpreted"


def _mypy_version() -> str:
    try:
        return importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        return "none"
