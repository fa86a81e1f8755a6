"""The sans-IO guard: importing p2pd.core pulls in no I/O library."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_io_libraries() -> None:
    code = (
        "import sys, pkgutil, importlib, p2pd.core\n"
        "for m in pkgutil.walk_packages(p2pd.core.__path__, 'p2pd.core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('trio', 'httpx', 'httpcore', 'zeroconf', 'anyio', 'socket', "
        "'asyncio', 'prometheus_client') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
