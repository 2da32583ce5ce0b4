"""How fast ``airlock migrate`` goes and how long it has left, counting conversions only.

A version that is skipped (already migrated, refused earlier, not ready) costs a download and
a check, not a sandbox: counted as work, eleven skips make the rest of a run look nearly done
("19/30 done, 1974.7/min, about 0s left" with 11 conversions ahead). The rate here is the
versions that went to the broker per minute of the run, and the time left assumes each
version not yet done needs one (an upper bound when some of them will be skipped too).
``batch.Throughput`` counts every item alike, which suits batches where every item converts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from airlock_client._migrate_report import Outcome, Status

#: Outcomes that took no conversion: the version was skipped.
SKIPPED = frozenset({Status.ALREADY_MIGRATED, Status.FAILED_EARLIER, Status.NOT_READY,
                     Status.WOULD_CONVERT})
#: Outcomes that count as failed in the progress line.
FAILED = frozenset({Status.REJECTED, Status.FAILED})


@dataclass
class Pace:
    """Outcomes of a run of ``total`` versions, for its progress lines."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    began: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.done += 1
            self.failed += outcome.status in FAILED
            self.skipped += outcome.status in SKIPPED

    @property
    def converted(self) -> int:
        """Versions that went to the broker (converted, or refused or failed by it)."""
        return self.done - self.skipped

    def per_minute(self) -> float:
        """Conversions per minute of the run so far."""
        return self._rate(self.converted)

    def versions_per_minute(self) -> float:
        """Every version done, skipped ones included, per minute of the run so far."""
        return self._rate(self.done)

    def eta_seconds(self) -> float | None:
        """Seconds left if every version not done yet needs a conversion; None while no
        conversion has ended (nothing to go by)."""
        rate = self.per_minute()
        if rate <= 0:
            return None
        return max(self.total - self.done, 0) * 60.0 / rate

    def line(self) -> str:
        """``12/200 done (1 failed, 30 skipped), 41.0/min, about 4m35s left``."""
        notes = [f"{n} {what}" for n, what in ((self.failed, "failed"),
                                               (self.skipped, "skipped")) if n]
        noted = f" ({', '.join(notes)})" if notes else ""
        eta = self.eta_seconds()
        left = "" if eta is None else f", about {_duration(eta)} left"
        return f"{self.done}/{self.total} done{noted}, {self.per_minute():.1f}/min{left}"

    def _rate(self, count: int) -> float:
        elapsed = time.monotonic() - self.began
        return count * 60.0 / elapsed if elapsed > 0 else 0.0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
