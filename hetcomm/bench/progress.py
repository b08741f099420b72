"""Progress of a hetcomm-bench run on stderr: one self-overwriting line with a bar.

Drawn only when stderr is a terminal, so logs, pipes and CI output stay clean.
The table goes to stdout, which usually shares the terminal: :meth:`Progress.clear`
wipes the bar before a table line is written and :meth:`Progress.update` redraws it.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import TextIO

BAR_WIDTH = 24


class Progress:
    """A ``[#####-----] 12/40 gloo allreduce 1M  0:14`` line on a terminal; silent elsewhere."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(1, total)
        self.done = 0
        self.what = "starting ranks"
        self.started = time.monotonic()
        self._drawn = False

    def update(self, what: str | None = None, advance: int = 0) -> None:
        """Count ``advance`` finished cases, describe what runs now, redraw."""
        self.done = min(self.total, self.done + advance)
        if what is not None:
            self.what = what
        if not self.enabled:
            return
        filled = BAR_WIDTH * self.done // self.total
        elapsed = int(time.monotonic() - self.started)
        line = (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self.done}/{self.total} "
                f"{elapsed // 60}:{elapsed % 60:02d}  {self.what}")
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()
        self._drawn = True

    def __enter__(self) -> "Progress":
        """While inside, every log record first wipes the bar (the next update redraws it)."""
        for h in logging.getLogger().handlers:
            h.addFilter(self._clear_filter)
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
        for h in logging.getLogger().handlers:
            h.removeFilter(self._clear_filter)

    def _clear_filter(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def clear(self) -> None:
        """Erase the line (before something else is printed on the terminal)."""
        if self._drawn:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            self.stream.write("\r" + " " * width + "\r")
            self.stream.flush()
            self._drawn = False
