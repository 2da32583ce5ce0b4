"""Many conversions from one client, a bounded number at a time, one outcome per item.

``run_bounded`` takes the items lazily (a registry of thousands is never listed into memory
at once), keeps at most ``concurrency`` of them in flight on threads (the gRPC channel is
shared and thread-safe; each conversion mostly waits on the broker), and yields each item's
``Done`` as it finishes, in completion order. An item's failure is its outcome, not the
batch's: the exception is carried in ``Done.error``. ``stop`` (called after every outcome)
ends the batch early: nothing new starts, and what is in flight is finished and yielded, so
no conversion is left half done and none is lost. An exception that is not an ``Exception``
(KeyboardInterrupt) does the same and is re-raised after the in-flight items finished; a
second Ctrl-C meanwhile calls ``abandon`` (the client closes its channel: each call in flight
is cancelled, and its broker job with it) and the batch ends as soon as they have returned.

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


def run_bounded(items: Iterable[T], work: Callable[[T], R], *, concurrency: int,
                stop: Callable[[Done[T, R]], bool] | None = None,
                abandon: Callable[[], None] | None = None
                ) -> Generator[Done[T, R], None, None]:
    """``work(item)`` for each item, at most ``concurrency`` at once; each outcome as it ends.

    A consumer that stops iterating early should ``close()`` the generator (``with
    contextlib.closing(...)``): that is when the items in flight are waited for. A second
    KeyboardInterrupt while they are waited for calls ``abandon``, which must make them
    return soon; without it, that interrupt is raised at once (the interpreter still waits
    for the threads when it exits). Raises ``ValueError`` for a concurrency outside
    1..``MAX_CONCURRENCY``."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, "
                         f"not {concurrency}")
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
        try:
            while True:
                while not stopped and len(running) < concurrency:
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
        except BaseException:
            # Interrupted (or the consumer stopped iterating): start nothing new and let what
            # is in flight finish, so that none is abandoned half way.
            for future in running:
                future.cancel()
            _wait_or_abandon(running, abandon)
            raise
    finally:
        # Not ``with``: its exit would wait for the threads again, after a second Ctrl-C.
        pool.shutdown(wait=False, cancel_futures=True)


def _wait_or_abandon(running: Iterable[Future[Done[T, R]]],
                     abandon: Callable[[], None] | None) -> None:
    """Wait for ``running``; on a second interrupt, ``abandon`` them and wait for them to
    return (a third interrupt, or no ``abandon``, leaves at once)."""
    try:
        wait(running)
    except KeyboardInterrupt:
        if abandon is None:
            raise
        abandon()
        wait(running)


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
