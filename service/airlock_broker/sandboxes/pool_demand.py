"""How many warm containers a stream of jobs needs (``[pools] stream_window_seconds``).

A job takes a warm container and its replacement is ready only a refill time later (the
container's start, then its worker's imports). Jobs arriving at ``rate`` per second meanwhile
find the pool empty unless it holds ``rate * refill`` more containers than the spare it keeps
anyway (Little's law): with one warm container per profile, back-to-back jobs fall to the cold
path (or wait for a start) as soon as they come faster than one per refill time.

Both figures are learned per pool: the rate from the jobs of the last window, the refill time
from warm containers seen going ready (their worker's mark, a hint only: it sizes the pool and
decides nothing about a job). Pure arithmetic, unit-tested; pools.py applies the result within
the configured caps.
"""

from __future__ import annotations

import math
from collections import deque

#: Refill time assumed until one is measured: a sklearn worker warms up in 1.5-4 s on this
#: project's 2-core machine (bench.profile), longer under load.
INITIAL_REFILL_SECONDS = 3.0
#: Below this many jobs per refill time the stream adds no container (see ``extra_warm``).
SPARSE = 0.5
#: Weight of the newest refill time in the running average (about the last ten starts count).
REFILL_WEIGHT = 0.2


class Demand:
    """One pool's arrivals over the last ``window`` seconds, and its refill time."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._arrivals: deque[float] = deque()
        self.refill_seconds = INITIAL_REFILL_SECONDS

    def arrive(self, now: float) -> None:
        """A job asked this pool for a container."""
        if self.window > 0:
            self._arrivals.append(now)
            self._forget(now)

    def refilled(self, seconds: float) -> None:
        """A container of this pool went from its start to ready in ``seconds``."""
        if seconds > 0:
            self.refill_seconds += REFILL_WEIGHT * (seconds - self.refill_seconds)

    def rate(self, now: float) -> float:
        """Jobs per second over the last window (0 when learning is off)."""
        if self.window <= 0:
            return 0.0
        self._forget(now)
        return len(self._arrivals) / self.window

    def extra_warm(self, now: float) -> int:
        """Containers to keep warm on top of the pool's spare for the current stream: those
        its jobs take while a replacement is being refilled, rounded up (refill times vary,
        and a job that finds the pool empty pays a whole start). Fewer jobs than one per two
        refill times add nothing: the spare, at least one, is there for those."""
        in_refill = self.rate(now) * self.refill_seconds
        return math.ceil(in_refill - 1e-9) if in_refill >= SPARSE else 0

    def _forget(self, now: float) -> None:
        while self._arrivals and self._arrivals[0] <= now - self.window:
            self._arrivals.popleft()
