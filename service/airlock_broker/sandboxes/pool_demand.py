"""How many warm containers a stream of jobs needs (``[pools] stream_window_seconds``).

A job takes a warm container and its replacement is ready only a refill time later (the
container's start, then its worker's imports). Jobs arriving at ``rate`` per second meanwhile
find the pool empty unless it holds ``rate * refill`` more containers than the spare it keeps
anyway (Little's law): with one warm container per profile, back-to-back jobs fall to the cold
path (or wait for a start) as soon as they come faster than one per refill time.

A rate averaged over the window misses a burst: ten jobs in a few seconds, after a quiet
minute, are a sixth of a job per second, and ask for one container. So the pool also keeps,
for the window, the stock its busiest refill time needed (``Demand.busiest``): the jobs that
arrived within one refill time of each other, all of whom a full pool would have served at
once, less the first, which the spare serves. A burst that ran the pool dry arrived slower
than it wanted to: a client converting one model after another asks for the next only when
the last is done, and that one waited for a start, or for the imports of the container it
took. So arrivals are placed on a clock that stops while a job is held back so (``stall_*``):
on it, ten such jobs arrive within a second or two.

The burst itself cannot be helped once it has begun: a refill costs CPU-seconds (a sklearn
job beyond the stock about 1.05 of the machine's, most of it its container's start: on this
project's 2-core machine at most about two a second), and warm jobs run faster than that.
The next burst within the window finds the stock warm.

Both figures are learned per pool: the arrivals from the jobs of the last window, the refill
time from warm containers seen going ready (their worker's mark, a hint only: it sizes the
pool and decides nothing about a job). Pure arithmetic, unit-tested; pools.py applies the
result within the configured caps and the memory budget.
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
    """One pool's arrivals over the last ``window`` seconds, and its refill time.

    ``bursts``: also keep the stock the window's busiest refill time needed (``busiest``);
    off, the average rate alone sizes the pool.
    """

    def __init__(self, window: float, *, bursts: bool = True) -> None:
        self.window = window
        self.bursts = bursts
        #: Each arrival's time, and its time on the clock that stops while jobs are held back.
        self._arrivals: deque[tuple[float, float]] = deque()
        self.refill_seconds = INITIAL_REFILL_SECONDS
        #: Jobs held back now, since when, and for how long before.
        self._stalls = 0
        self._stalled_since: float | None = None
        self._stalled = 0.0

    def arrive(self, now: float) -> None:
        """A job asked this pool for a container."""
        if self.window > 0:
            self._arrivals.append((now, self._unstalled(now)))
            self._forget(now)

    def stall_began(self, now: float) -> None:
        """A job is held back by the pool: it waits for a start, or took a container whose
        worker is still importing. The clock ``busiest`` counts on stops until none is."""
        if not self._stalls:
            self._stalled_since = now
        self._stalls += 1

    def stall_ended(self, now: float) -> None:
        """A job held back (``stall_began``) no longer is."""
        self._stalls = max(0, self._stalls - 1)
        if not self._stalls and self._stalled_since is not None:
            self._stalled += max(0.0, now - self._stalled_since)
            self._stalled_since = None

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

    def busiest(self, now: float) -> int:
        """The most jobs of the last window that arrived within one refill time, on the
        clock that stops while jobs are held back (0 when learning is off)."""
        self._forget(now)
        times = [unstalled for _, unstalled in self._arrivals]
        most = first = 0
        for last, at in enumerate(times):
            while at - times[first] >= self.refill_seconds:
                first += 1
            most = max(most, last - first + 1)
        return most

    def extra_warm(self, now: float) -> int:
        """Containers to keep warm on top of the pool's spare for the current stream: the
        larger of two needs.

        The stream's: the containers its jobs take while a replacement is being refilled,
        rounded up (refill times vary, and a job that finds the pool empty pays a whole
        start); fewer jobs than one per two refill times add nothing, the spare (at least
        one) is there for those. The bursts': the busiest refill time's jobs less the one
        the spare serves, so that a job now and then adds nothing either.

        Kept warm for the whole window, what a burst left behind costs memory, hardly CPU:
        its start was paid once, by the job that takes it (or every ``max_age_seconds`` if
        none does), and while it waits its worker sleeps on its doorbell under runc, next to
        no CPU (pool_settings.WARM_MEMORY_MIB has the figures). pools.py caps the memory.
        """
        in_refill = self.rate(now) * self.refill_seconds
        stream = math.ceil(in_refill - 1e-9) if in_refill >= SPARSE else 0
        burst = self.busiest(now) - 1 if self.bursts else 0
        return max(stream, burst)

    def _unstalled(self, now: float) -> float:
        if self._stalled_since is not None:
            return self._stalled_since - self._stalled
        return now - self._stalled

    def _forget(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= now - self.window:
            self._arrivals.popleft()
