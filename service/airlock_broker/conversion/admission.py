"""Admission control: a bounded number of jobs running, a bounded number waiting.

A request beyond both bounds is refused at once with BUSY (RESOURCE_EXHAUSTED) carrying the
broker's estimate of the wait (wait_estimate.py), which the client library honours while it
retries until its own deadline; nothing queues without limit. So is one beyond
``max_per_principal`` of its caller's: one principal (all unauthenticated callers are one,
"anonymous") cannot take every place. Before any of that, the broker's readiness
(readiness.py) is asked: a broker that is stopping, not yet self-tested, drained by an
operator or without its engine refuses before the upload is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

from airlock_broker.conversion.wait_estimate import JobTimes
from airlock_broker.errors import AirlockError, Reason, RetryAfter, error
from airlock_broker.readiness import Readiness


class Admission:
    def __init__(self, max_running: int, max_waiting: int,
                 max_per_principal: int | None = None, *,
                 readiness: Readiness | None = None) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_per_principal = max_per_principal or max_running + max_waiting
        self._admitted = 0
        self._by_principal: Counter[str] = Counter()
        self._running = asyncio.Semaphore(max_running)
        self._in_slot = 0
        #: How long jobs hold a sandbox place, for BUSY's estimate of the wait.
        self.job_times = JobTimes()
        self.readiness = readiness or Readiness()

    @property
    def admitted(self) -> int:
        """Jobs inside the broker: uploading, waiting for a sandbox, or running."""
        return self._admitted

    @contextlib.asynccontextmanager
    async def admit(self, principal: str = "") -> AsyncIterator[None]:
        """Hold a place in the broker for the whole request, or raise BUSY / UNAVAILABLE."""
        self.readiness.check()  # every hold: refused before the upload, not after it
        if self._admitted >= self.max_running + self.max_waiting:
            raise self.busy()
        held = self._by_principal[principal]
        if held >= self.max_per_principal:
            raise self.busy(f"{held} jobs of principal {principal!r} in progress, the limit per "
                            f"principal is {self.max_per_principal} (of "
                            f"{self.max_running + self.max_waiting} places)")
        self._admitted += 1
        self._by_principal[principal] += 1
        try:
            yield
        finally:
            self._admitted -= 1
            self._by_principal[principal] -= 1
            if not self._by_principal[principal]:
                del self._by_principal[principal]

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

    def busy(self, why: str = "") -> AirlockError:
        """BUSY, with the estimated wait: the jobs not yet in a sandbox, then one more.
        ``why`` replaces the opening words when the refusal is not the broker being full."""
        queued = self._admitted - self._in_slot
        wait = self.job_times.wait(queued, self.max_running)
        why = why or (f"{self._admitted} jobs in progress, the limit is "
                      f"{self.max_running + self.max_waiting}")
        return error(Reason.BUSY,
                     f"{why} ({queued} waiting for one of "
                     f"{self.max_running} sandboxes, recent jobs took {wait.job_seconds:.1f} s "
                     f"each); retry in about {wait.seconds:.0f} s",
                     retry_after=RetryAfter(seconds=wait.seconds, queued=queued))
