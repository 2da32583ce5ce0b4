"""The samplers' common part: a daemon thread that runs ``_run`` between ``with`` entry and
exit; ``_run`` loops until ``_stop`` is set (``self._stop.wait(interval)`` between samples)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Self


@dataclass
class ThreadedSampler:
    _stop: threading.Event = field(default_factory=threading.Event, kw_only=True, repr=False)
    _thread: threading.Thread | None = field(default=None, kw_only=True, repr=False)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError
