"""A one-line upload progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIN_BYTES = 8 * 1024 * 1024


class ProgressBar:
    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self._last = 0.0
        self._began = time.monotonic()
        self._drawn = False

    @classmethod
    def for_upload(cls, label: str, size: int) -> ProgressBar | None:
        """A bar for a large upload on a TTY, else None (scripts and pipes see nothing)."""
        return cls(label) if size >= MIN_BYTES and sys.stderr.isatty() else None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        rate = done / max(now - self._began, 1e-6) / 1e6
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{frac:4.0%} {done / 1e6:.0f}/{total / 1e6:.0f} MB {rate:.0f} MB/s")
        self._drawn = True
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
