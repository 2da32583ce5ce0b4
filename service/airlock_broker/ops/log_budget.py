"""A bound on how many lines one kind of event writes to the broker's log.

Refusals are written to the log one line each, and anyone who can reach a port can be
refused: a caller sending thousands of bad calls a second filled the disk, or made journald's
rate limit drop the broker's other lines (a sandbox's failure, an operator's drain). A
``LogBudget`` lets ``per_window`` lines through in each window and counts the rest; the next
line written says how many were left out. The metrics count every refusal either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LogBudget:
    """``take()``: whether to write this line, and how many were left out before it."""

    def __init__(self, per_window: int = 20, window_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._began = -window_seconds
        self._written = 0
        self._dropped = 0

    def take(self) -> tuple[bool, int]:
        with self._lock:
            now = self._clock()
            if now - self._began >= self.window_seconds:
                self._began, self._written = now, 0
            if self._written >= self.per_window:
                self._dropped += 1
                return False, 0
            self._written += 1
            dropped, self._dropped = self._dropped, 0
            return True, dropped


def left_out(dropped: int) -> str:
    """What a line adds for the lines its budget left out before it."""
    return f" ({dropped} more like it not logged)" if dropped else ""
