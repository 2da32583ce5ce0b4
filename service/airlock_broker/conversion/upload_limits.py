"""How slow an upload may be, and how much free space it must leave on the spool's disk.

Why: an upload holds one of the broker's admission places from its first message to its last.
An idle timeout alone lets a client keep a place for ever by sending one byte just before it
fires; eighteen such clients hold every place and no one else converts. So an upload must also
keep an average rate once a grace period is over, and finish within a total deadline (both
for a gRPC stream and for the same-host fast path's read of a descriptor, which a slow or hung
file can stall the same way). The spool's filesystem keeps a reserve of free space that no
upload may eat into: a full disk breaks more than the broker (spool_space.py applies it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from airlock_broker.errors import AirlockError, Reason, error

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class UploadLimits:
    """``[upload]``. Every limit is finite by default; ``min_bytes_per_second = 0`` turns the
    rate check off (visibly), the total deadline stays."""

    #: After the grace period the upload must average at least this (bytes since the start
    #: >= rate x (elapsed - grace)). 1 MiB/s is 8 Mbit/s: any link a model registry is
    #: reached over does more; a client dribbling bytes to hold a place does much less.
    min_bytes_per_second: int = 1 * MiB
    #: Free time at the start (connection, TLS, the client opening its file). Also the longest
    #: wait for the first message (the metadata), which a real client sends at once.
    grace_seconds: float = 10.0
    #: The whole upload, from the first message. None: the grace plus ``max_artifact_bytes``
    #: at the minimum rate (16 GiB at 1 MiB/s: about 4.6 h; 1 MiB/s when the rate check is
    #: off), so that the largest artifact the broker accepts can always arrive at the minimum
    #: rate; a number caps it lower.
    deadline_seconds: float | None = None
    #: The spool's filesystem keeps at least this much free (bytes available to unprivileged
    #: users, so ext4's root reserve is kept too): an upload that would go below is refused
    #: (SPOOL_FULL) before its bytes are written, or as soon as it crosses it.
    spool_min_free_bytes: int = 1 * GiB
    #: ... or this fraction of the filesystem's size, whichever is larger.
    spool_min_free_ratio: float = 0.01
    #: What one caller's uploads in progress may still write on the spool together, as a
    #: share of the free space above the reserve, once it has more than one. An upload is
    #: promised its declared size before its first byte, and may take hours at the minimum
    #: rate; without a share, one caller with a few 16 GiB uploads of zeros (holes: the disk
    #: stays empty) had every other caller's uploads refused SPOOL_FULL for as long (found in
    #: review). A caller's only upload may take all the room, as before: one job is never
    #: refused by the share. Answers are not counted: they are claimed for data that has
    #: arrived. 1.0: no share (one tenant).
    spool_share_per_caller: float = 0.5

    def __post_init__(self) -> None:
        if self.min_bytes_per_second < 0:
            raise ValueError("min_bytes_per_second must be >= 0 (0: no rate check)")
        if self.grace_seconds <= 0:
            raise ValueError("grace_seconds must be positive")
        if self.deadline_seconds is not None and self.deadline_seconds <= 0:
            raise ValueError("deadline_seconds must be positive")
        if self.spool_min_free_bytes < 0 or not 0 <= self.spool_min_free_ratio < 1:
            raise ValueError("spool_min_free_bytes must be >= 0 and spool_min_free_ratio "
                             "in [0, 1)")
        if not 0 < self.spool_share_per_caller <= 1:
            raise ValueError("spool_share_per_caller must be in (0, 1]")

    def deadline_for(self, max_artifact_bytes: int) -> float:
        if self.deadline_seconds is not None:
            return self.deadline_seconds
        return self.grace_seconds + max_artifact_bytes / (self.min_bytes_per_second or MiB)


class Pace:
    """The clock of one upload: is it still fast enough, and how long may we wait for more?

    ``received`` is what has arrived so far; the upload is too slow once
    ``received < rate x (elapsed - grace)``, and too late once ``elapsed > deadline``. Waiting
    for the next bytes is bounded by ``remaining``, the moment either would become true, so a
    client that stops sending is cut off then, not at some later idle timeout.
    """

    def __init__(self, limits: UploadLimits, max_artifact_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.deadline = limits.deadline_for(max_artifact_bytes)
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining(self, received: int) -> float:
        """Seconds until the upload is too slow or too late if nothing more arrives (<= 0:
        it already is)."""
        return min(self._deadline_left(), self._rate_left(received))

    def _deadline_left(self) -> float:
        return self.deadline - self.elapsed()

    def _rate_left(self, received: int) -> float:
        rate = self.limits.min_bytes_per_second
        if not rate:
            return float("inf")
        return self.limits.grace_seconds + received / rate - self.elapsed()

    def check(self, received: int) -> float:
        """``remaining``, or UPLOAD_TOO_SLOW if nothing is."""
        left = self.remaining(received)
        if left > 0:
            return left
        raise self.error(received)

    def error(self, received: int) -> AirlockError:
        """UPLOAD_TOO_SLOW for whichever limit ran out (first), with what was measured."""
        elapsed = self.elapsed()
        if self._deadline_left() <= self._rate_left(received):
            return error(Reason.UPLOAD_TOO_SLOW,
                         f"the upload took over {self.deadline:g} s, the broker's limit for "
                         f"one upload ({received} bytes had arrived); send it faster or ask "
                         "the operator about [upload] deadline_seconds")
        rate = self.limits.min_bytes_per_second
        return error(Reason.UPLOAD_TOO_SLOW,
                     f"the upload is too slow: {received} bytes in {elapsed:.1f} s "
                     f"({human_rate(received / max(elapsed, 1e-9))}); this broker requires at "
                     f"least {human_rate(rate)} ({rate} bytes/s) after the first "
                     f"{self.limits.grace_seconds:g} s")


def human_rate(bytes_per_second: float) -> str:
    for unit, size in (("MiB/s", MiB), ("KiB/s", 1024)):
        if bytes_per_second >= size:
            return f"{bytes_per_second / size:.1f} {unit}"
    return f"{bytes_per_second:.1f} B/s"
