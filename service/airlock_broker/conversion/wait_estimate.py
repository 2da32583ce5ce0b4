"""How long a caller refused with BUSY should wait: queue depth times recent job time.

When every admission place is taken the broker refuses at once (admission.py) and tells the
caller when to try again (``google.rpc.RetryInfo``, see wire.status_of). A fan-out of callers
that all retry after a fixed short backoff keeps hitting a full broker, gives up, and fails
jobs it only needed to delay; one told how long the queue needs spreads its retries over that
time. The estimate is the time until the jobs already waiting have reached a sandbox and one
more place has freed, for this caller: places free ``places`` at a time, each held about as
long as recent jobs held theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Until a job has finished, a job is assumed to hold its place this long: a warm small sklearn
#: or PyTorch job takes 1-3 s here, a cold one 4-8 s.
PRIOR_JOB_SECONDS = 5.0
#: Weight of the newest job in the moving average: about the last ten jobs count.
WEIGHT = 0.2
#: A recorded duration beyond this (a job at a long deadline) is counted as this, so that one
#: outlier cannot make every caller wait for minutes.
MAX_JOB_SECONDS = 600.0
#: Never tell a caller to come back sooner than this (a place rarely frees faster) ...
MIN_WAIT_SECONDS = 1.0
#: ... nor later than this: the estimate is coarse, and a caller told too long waits idle.
MAX_WAIT_SECONDS = 300.0


@dataclass(frozen=True)
class WaitEstimate:
    """What the broker tells a refused caller."""

    seconds: float  # retry after about this long
    queued: int  # jobs admitted that hold no sandbox place yet
    job_seconds: float  # how long recent jobs held a place


class JobTimes:
    """A moving estimate of how long a job holds a sandbox place (exponentially weighted)."""

    def __init__(self, prior: float = PRIOR_JOB_SECONDS, weight: float = WEIGHT) -> None:
        if prior <= 0 or not 0 < weight <= 1:
            raise ValueError("prior must be positive and weight in (0, 1]")
        self._typical = prior
        self._weight = weight

    @property
    def typical(self) -> float:
        return self._typical

    def record(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        seconds = min(max(seconds, 0.0), MAX_JOB_SECONDS)
        self._typical += self._weight * (seconds - self._typical)

    def wait(self, queued: int, places: int) -> WaitEstimate:
        """The wait for ``queued`` jobs, then one more, to start, ``places`` at a time."""
        raw = (max(queued, 0) + 1) * self._typical / max(places, 1)
        seconds = min(max(raw, MIN_WAIT_SECONDS), MAX_WAIT_SECONDS)
        return WaitEstimate(seconds=seconds, queued=max(queued, 0), job_seconds=self._typical)
