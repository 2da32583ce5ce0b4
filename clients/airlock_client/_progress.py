"""What the CLI shows on stderr while it works: an upload progress bar (on a terminal only),
and a line each time it waits for a full broker."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from airlock_client._types import BusyWait

MIN_BYTES = 8 * 1024 * 1024
_LINES = threading.Lock()


def write_line(text: str, stream: TextIO | None = None) -> None:
    """``text`` and a newline in one write, one thread at a time: lines from the threads of
    a batch (``migrate --jobs``) never interleave mid-line."""
    out = stream or sys.stderr
    with _LINES:
        out.write(text + "\n")
        out.flush()


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


def busy_notice(command: str, stream: TextIO | None = None) -> Callable[[BusyWait], None]:
    """``Client.convert``'s ``on_busy`` for the CLI: one line per wait, terminal or not (a
    script's log shows why the call takes long). Only numbers: the broker's text is not shown."""
    def notice(wait: BusyWait) -> None:
        queue = "?" if wait.queued is None else str(wait.queued)
        write_line(f"airlock {command}: waiting for a sandbox (queue {queue}); trying again in "
                   f"{wait.seconds:.0f} s", stream)
    return notice
