"""A validator's stderr, read by the broker through a pipe: bounded, then escaped, then logged.

What a validator writes to stderr may come from a subverted parser: a flood (that would fill
the broker's log or memory) or terminal escapes and line breaks (that would forge log records
or drive an operator's terminal). The broker reads the pipe to its end in a thread of its own
(so the writer never blocks on a full pipe), keeps the first ``limit`` bytes, counts the rest,
and logs one record in which every control character is shown as an escape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from airlock_broker.hostile_text import escape

log = logging.getLogger(__name__)

_READ_BYTES = 64 * 1024


class StderrDrain:
    """Reads the pipe ``fd`` (which it owns and closes) until EOF, keeping ``limit`` bytes."""

    def __init__(self, fd: int, limit: int, label: str) -> None:
        self._fd = fd
        self._limit = limit
        self.label = label
        self._kept = bytearray()
        #: Bytes the writer sent, kept or not.
        self.total = 0
        self._thread = threading.Thread(target=self._run, name=f"stderr {label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := os.read(self._fd, _READ_BYTES):
                self.total += len(chunk)
                room = self._limit - len(self._kept)
                if room > 0:
                    self._kept += chunk[:room]
        except OSError as exc:
            log.warning("could not read %s's stderr: %s", self.label, exc)
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        if self.total:
            cut = (f", the first {len(self._kept)} shown" if self.total > len(self._kept)
                   else "")
            log.warning("%s wrote %d bytes to stderr%s: %s", self.label, self.total, cut,
                        escape(bytes(self._kept)))

    @property
    def kept(self) -> bytes:
        """What was kept so far (for tests and for the record)."""
        return bytes(self._kept)

    def join(self, timeout: float) -> None:
        """Wait for EOF (the writer and every copy of its end closed) and the record."""
        self._thread.join(timeout)
