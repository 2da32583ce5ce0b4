"""When a conversion is tried again, and for how long (the client's two retry policies).

- **BUSY** (every place in the broker is taken): the job was refused before it started, so
  waiting costs nothing but time. It is retried until the call's deadline. Each wait is at
  least the broker's estimate (``google.rpc.RetryInfo``), plus jitter so that a fan-out of
  callers refused together does not come back together; a broker that gives no estimate gets
  a capped exponential backoff instead. A wait that would leave no time for the attempt after
  it is not taken: the BUSY is raised then, its message holding the broker's estimate.
- **UNAVAILABLE** (unreachable, or no sandbox can run): a bounded number of attempts in a
  row within a bounded time, with jittered exponential backoff: an outage that lasts is
  reported, not waited out.

Nothing else is retried: an artifact's own failure would only fail again. Every attempt
sends the same idempotency key, so the broker converts at most once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState, Retrying, retry_if_exception

from airlock_client._errors import ConversionError, ServiceUnavailable
from airlock_client._types import BusyWait

log = logging.getLogger("airlock_client")

#: A caller of ``Client.convert`` told each time the client waits because the broker is busy.
OnBusy = Callable[[BusyWait], None]


@dataclass(frozen=True)
class RetryPolicy:
    """The numbers of both policies; each field says why it is what it is."""

    #: UNAVAILABLE: attempts in a row, and seconds since the first of them, before giving up.
    unavailable_attempts: int = 4
    unavailable_seconds: float = 60.0
    #: False: BUSY is raised at once (a caller with somewhere else to send the job).
    wait_when_busy: bool = True
    #: BUSY without the broker's estimate: 0.5 s, doubling, at most 30 s (and with one, never
    #: less than 0.5 s).
    busy_initial_seconds: float = 0.5
    busy_max_seconds: float = 30.0
    #: Each BUSY wait is stretched by up to this fraction, at random, never shortened.
    jitter: float = 0.5
    #: Less time than this left after a wait: no attempt could finish, so do not wait.
    min_attempt_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.unavailable_attempts < 1:
            raise ValueError("unavailable_attempts must be at least 1")
        if min(self.unavailable_seconds, self.busy_initial_seconds, self.busy_max_seconds,
               self.jitter, self.min_attempt_seconds) < 0:
            raise ValueError("retry times must not be negative")


class RetrySchedule:
    """One call's retries: tenacity's ``retry``, ``wait``, ``stop`` and ``before_sleep``.

    ``wait`` decides (tenacity asks it before ``stop``); ``stop`` reports that decision.
    """

    def __init__(self, policy: RetryPolicy, deadline: float, on_busy: OnBusy | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.deadline = deadline
        self.on_busy = on_busy
        self._clock = clock
        self._rand = rand
        self._busy_in_a_row = 0
        self._unavailable_in_a_row = 0
        self._unavailable_since = 0.0
        self._give_up = False
        self._pending: BusyWait | None = None

    def retrying(self, sleep: Callable[[float], None] = time.sleep) -> Retrying:
        return Retrying(retry=retry_if_exception(self.retryable), wait=self.wait,
                        stop=self.stop, before_sleep=self.before_sleep, sleep=sleep,
                        reraise=True)

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, ServiceUnavailable):
            return True
        return _busy(exc) and self.policy.wait_when_busy

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        now = self._clock()
        self._pending = None
        if isinstance(exc, ConversionError) and _busy(exc):
            self._unavailable_in_a_row = 0  # the broker answered: the outage, if any, is over
            self._busy_in_a_row += 1
            return self._busy_wait(exc, now, state.attempt_number)
        self._busy_in_a_row = 0
        if self._unavailable_in_a_row == 0:
            self._unavailable_since = now
        self._unavailable_in_a_row += 1
        policy = self.policy
        # Full jitter up to a capped doubling (0.25 s, 0.5 s, ... 8 s), as before.
        pause = self._rand() * min(8.0, 0.25 * 2 ** (self._unavailable_in_a_row - 1))
        self._give_up = (self._unavailable_in_a_row >= policy.unavailable_attempts
                         or now - self._unavailable_since >= policy.unavailable_seconds
                         or now + pause > self.deadline - policy.min_attempt_seconds)
        return 0.0 if self._give_up else pause

    def _busy_wait(self, exc: ConversionError, now: float, attempt: int) -> float:
        policy = self.policy
        hint = exc.retry_after
        if hint is not None:  # a broker saying "now" every time must not be hammered
            base = max(hint, policy.busy_initial_seconds)
        else:
            base = min(policy.busy_max_seconds,
                       policy.busy_initial_seconds * 2 ** (self._busy_in_a_row - 1))
        pause = base * (1.0 + policy.jitter * self._rand())
        # Never past the deadline, never sooner than the broker said.
        pause = min(pause, self.deadline - policy.min_attempt_seconds - now)
        self._give_up = pause < (hint or 0.0)
        if self._give_up:
            return 0.0
        self._pending = BusyWait(queued=exc.queued, retry_after=hint, seconds=pause,
                                 attempt=attempt, message=exc.message)
        return pause

    def stop(self, state: RetryCallState) -> bool:
        return self._give_up

    def before_sleep(self, state: RetryCallState) -> None:
        waiting = self._pending
        exc = state.outcome.exception() if state.outcome is not None else None
        if waiting is None:
            log.info("retrying in %.1f s: %s", state.upcoming_sleep, exc)
            return
        log.info("the broker is busy (queue %s): trying again in %.1f s",
                 "?" if waiting.queued is None else waiting.queued, waiting.seconds)
        if self.on_busy is not None:
            self.on_busy(waiting)  # an exception here ends the call: the caller's way to stop


def _busy(exc: BaseException) -> bool:
    return (isinstance(exc, ConversionError) and exc.code == "RESOURCE_EXHAUSTED"
            and exc.reason == "BUSY")
