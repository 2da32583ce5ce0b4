"""Admission control: a bounded number of jobs running, a bounded number waiting.

A request beyond both bounds is refused at once with BUSY (RESOURCE_EXHAUSTED) carrying the
broker's estimate of the wait (wait_estimate.py), which the client library honours while it
retries until its own deadline; nothing queues without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from airlock_broker.errors import AirlockError, Reason, RetryAfter, error
from airlock_broker.wait_estimate import JobTimes


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._admitted = 0
        self._running = asyncio.Semaphore(max_running)
        self._in_slot = 0
        #: How long jobs hold a sandbox place, for BUSY's estimate of the wait.
        self.job_times = JobTimes()
        self.draining = False
        #: Why the broker must not serve yet (the isolation self-test failed), or None.
        self.unready: str | None = None
        #: Why no sandbox can run now (the engine is unreachable), or None; set by the pools.
        self.sandbox_down: str | None = None

    @property
    def admitted(self) -> int:
        """Jobs inside the broker: uploading, waiting for a sandbox, or running."""
        return self._admitted

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place in the broker for the whole request, or raise BUSY / UNAVAILABLE."""
        if self.draining:
            raise error(Reason.SANDBOX_UNAVAILABLE, "the broker is shutting down")
        if self.unready is not None:
            raise error(Reason.SANDBOX_UNAVAILABLE, self.unready)
        if self.sandbox_down is not None:  # refused before the upload, not after it
            raise error(Reason.SANDBOX_UNAVAILABLE, self.sandbox_down)
        if self._admitted >= self.max_running + self.max_waiting:
            raise self.busy()
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    @contextlib.asynccontextmanager
    async def run_slot(self) -> AsyncIterator[None]:
        """Wait for one of the ``max_running`` sandbox places."""
        async with self._running:
            self._in_slot += 1
            began = time.monotonic()
            ended = False  # a job its caller abandoned says nothing of how long jobs take
            try:
                yield
                ended = True
            except AirlockError:
                ended = True  # refused or failed: it held the place all the same
                raise
            finally:
                self._in_slot -= 1
                if ended:
                    self.job_times.record(time.monotonic() - began)

    def busy(self) -> AirlockError:
        """BUSY, with the estimated wait: the jobs not yet in a sandbox, then one more."""
        queued = self._admitted - self._in_slot
        wait = self.job_times.wait(queued, self.max_running)
        return error(Reason.BUSY,
                     f"{self._admitted} jobs in progress, the limit is "
                     f"{self.max_running + self.max_waiting} ({queued} waiting for one of "
                     f"{self.max_running} sandboxes, recent jobs took {wait.job_seconds:.1f} s "
                     f"each); retry in about {wait.seconds:.0f} s",
                     retry_after=RetryAfter(seconds=wait.seconds, queued=queued))
