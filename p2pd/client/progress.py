"""Progress bars for the operator commands (``rich``), silent when not on a terminal or
when the output is ``--json``."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as RichProgress,
)


def human_size(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``3.2 MiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    unit = units[step]
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


class Progress:
    """One bar of bytes (or items) with a note beside it; thread-safe."""

    def __init__(self, enabled: bool, *, unit: str = "bytes") -> None:
        console = Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        columns = [TextColumn("{task.description}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit)]
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
        self._bar = RichProgress(*columns, console=console, disable=not self.enabled)
        self._task: TaskID | None = None

    def start(self, description: str, total: float) -> None:
        """Show the bar (a second call starts another bar below the first)."""
        if self._task is None:
            self._bar.start()
        self._task = self._bar.add_task(description, total=total, note="")

    def advance(self, amount: float) -> None:
        """Move the bar on."""
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def note(self, text: str) -> None:
        """Set the text beside the bar."""
        if self._task is not None:
            self._bar.update(self._task, note=text)

    def finish(self) -> None:
        """Leave the bars as they are and stop redrawing."""
        self._bar.stop()
