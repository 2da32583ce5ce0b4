"""Many conversions from one client, a bounded number at a time, one outcome per item.

``run_bounded`` takes the items lazily (a registry of thousands is never listed into memory
at once), keeps at most ``concurrency`` of them in flight on threads (the gRPC channel is
shared and thread-safe; each conversion mostly waits on the broker), and yields each item's
``Done`` as it finishes, in completion order. An item's failure is its outcome, not the
batch's: the exception is carried in ``Done.error``. ``stop`` (called after every outcome)
and ``halt`` (an event: a command's Ctrl-C handler sets it) end the batch early: nothing new
starts, and what is in flight is finished and yielded, so no conversion is left half done
and none is lost. A KeyboardInterrupt (or ``close()``) also starts nothing new; what is in
flight is waited for, not yielded (the consumer has the interrupt), and the interrupt is
raised. ``abandon`` makes the items in flight end soon (the client closes its channel: each
call is cancelled, and its broker job with it): it is called on a KeyboardInterrupt that
comes while they are waited for, or at once when ``halt`` was already set. The items in
flight are always waited for: a thread left running would write after its consumer cleaned
up.

``Throughput`` turns outcomes into the numbers a progress line needs (rate and ETA).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: The most conversions one client keeps in flight (a broker runs 18 jobs at most by default).
MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class Done(Generic[T, R]):
    """One item's outcome: its ``result``, or the ``error`` its work raised."""

    item: T
    result: R | None
    error: Exception | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


def check_concurrency(value: int, name: str = "concurrency") -> None:
    """``ValueError`` unless 1 <= ``value`` <= ``MAX_CONCURRENCY``."""
    if not 1 <= value <= MAX_CONCURRENCY:
        raise ValueError(f"{name} must be between 1 and {MAX_CONCURRENCY}, not {value}")


def run_bounded(items: Iterable[T], work: Callable[[T], R], *, concurrency: int,
                stop: Callable[[Done[T, R]], bool] | None = None,
                halt: threading.Event | None = None,
                abandon: Callable[[], None] | None = None
                ) -> Generator[Done[T, R], None, None]:
    """``work(item)`` for each item, at most ``concurrency`` at once; each outcome as it ends
    (see the module docstring for ``stop``, ``halt`` and ``abandon``).

    A consumer that stops iterating early should ``close()`` the generator (``with
    contextlib.closing(...)``): that is when the items in flight are waited for. Raises
    ``ValueError`` for a concurrency outside 1..``MAX_CONCURRENCY``, on the first ``next``."""
    check_concurrency(concurrency)
    source = iter(items)
    running: dict[Future[Done[T, R]], T] = {}
    stopped = False

    def timed(item: T) -> Done[T, R]:
        began = time.monotonic()
        try:
            return Done(item, work(item), None, time.monotonic() - began)
        except Exception as exc:  # the item's outcome; the batch goes on
            return Done(item, None, exc, time.monotonic() - began)

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="airlock-batch")
    try:
        while True:
            while not stopped and len(running) < concurrency:
                if halt is not None and halt.is_set():
                    stopped = True
                    break
                try:
                    item = next(source)
                except StopIteration:
                    stopped = True
                    break
                running[pool.submit(timed, item)] = item
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                del running[future]
                done = future.result()
                if stop is not None and stop(done):
                    stopped = True
                yield done
    except BaseException as exc:
        # Interrupted (or the consumer stopped iterating): start nothing new; what is in
        # flight ends before this does.
        for future in running:
            future.cancel()
        hurry = isinstance(exc, KeyboardInterrupt) and halt is not None and halt.is_set()
        _wait_for(running, abandon, hurry)
        raise
    finally:
        pool.shutdown(wait=False)  # idle by now: every item in flight has returned


def _wait_for(running: Iterable[Future[Done[T, R]]], abandon: Callable[[], None] | None,
              hurry: bool) -> None:
    """Wait until every item in ``running`` has returned. ``abandon`` is called once: at
    once if ``hurry``, else on the first KeyboardInterrupt meanwhile. No interrupt cuts the
    wait short."""
    while True:
        if hurry and abandon is not None:
            abandon()
            abandon = None
        try:
            wait(running)
            return
        except KeyboardInterrupt:
            hurry = True


@dataclass
class Throughput:
    """Counts outcomes of a batch of ``total`` items (None: unknown) for progress lines."""

    total: int | None = None
    done: int = 0
    failed: int = 0
    began: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1

    def per_minute(self) -> float:
        elapsed = time.monotonic() - self.began
        return self.done * 60.0 / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far; None while unknown."""
        rate = self.per_minute()
        if self.total is None or rate <= 0:
            return None
        return max(self.total - self.done, 0) * 60.0 / rate

    def line(self) -> str:
        """``12/200 done (1 failed), 41.0/min, about 4m35s left``."""
        of = f"/{self.total}" if self.total is not None else ""
        failed = f" ({self.failed} failed)" if self.failed else ""
        eta = self.eta_seconds()
        left = "" if eta is None else f", about {format_duration(eta)} left"
        return f"{self.done}{of} done{failed}, {self.per_minute():.1f}/min{left}"


def format_duration(seconds: float) -> str:
    """``45s``, ``4m35s``, ``2h05m``: a time left, as progress lines say it."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


__all__ = ["MAX_CONCURRENCY", "Done", "Throughput", "format_duration", "run_bounded"]
