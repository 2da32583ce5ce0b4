"""What the CLI shows on stderr while it works: an upload progress bar (on a terminal only),
a line each time it waits for a full broker, and a line now and then while a long
conversion runs."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from airlock_client._types import BusyWait

MIN_BYTES = 8 * 1024 * 1024
#: How often a conversion still running says so: a multi-GB checkpoint takes minutes in its
#: sandbox, and nothing else is printed until it ends.
HEARTBEAT_SECONDS = 30.0
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


class Heartbeat:
    """``with Heartbeat("convert", status):`` a line on stderr every ``interval`` seconds
    while the block runs: ``airlock convert: STATUS, 2m30s so far`` (``status()`` says what
    is under way). Terminal or not: a script's log shows the command is alive. Its thread
    stops when the block ends."""

    def __init__(self, command: str, status: Callable[[], str],
                 interval: float = HEARTBEAT_SECONDS, stream: TextIO | None = None) -> None:
        self.command = command
        self.status = status
        self.interval = interval
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="airlock-heartbeat",
                                        daemon=True)

    def __enter__(self) -> Heartbeat:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from airlock_client.batch import format_duration

        while not self._stop.wait(self.interval):
            elapsed = format_duration(time.monotonic() - self._began)
            write_line(f"airlock {self.command}: {self.status()}, {elapsed} so far",
                       self.stream)
