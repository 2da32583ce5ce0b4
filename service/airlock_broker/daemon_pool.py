"""A thread pool whose threads never keep the broker from exiting.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits: a
thread blocked for ever in the kernel (a read of a hung FUSE or NFS file, a write the disk
never takes) would keep the broker from stopping. These threads are daemons, started on
demand, at most ``workers``; each pool is its owner's alone, so what blocks its threads
blocks nothing else (the event loop's default executor has ``min(32, cpus + 4)`` threads,
shared by everything that calls ``to_thread``).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DaemonPool(Executor):
    """``ThreadPoolExecutor`` with daemon threads (started on demand, at most ``workers``)."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[object], Callable[[], object]] | None] = \
            queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, functools.partial(fn, *args, **kwargs)))  # type: ignore[arg-type]
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}_{len(self._threads)}")
                thread.start()
                self._threads.append(thread)
        return future

    def run_anyway(self, fn: Callable[[], object]) -> None:
        """``fn()`` on a pool thread; once the pool is shut down (its owner is stopping), on a
        daemon thread of its own: for work that must happen whatever, such as a close."""
        try:
            self.submit(fn)
        except RuntimeError:  # shut down
            threading.Thread(target=fn, daemon=True, name=self._name).start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:  # handed to the future's owner
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, call
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while (item := self._queue.get_nowait()) is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()
