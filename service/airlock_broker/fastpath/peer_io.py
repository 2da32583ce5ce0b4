"""The threads that touch a same-host peer's descriptors, and only those.

Why: a read of a file on a filesystem that hangs (a FUSE daemon that never answers, a dead
NFS server, an overlay whose lower layer is either) blocks its thread in the kernel until the
filesystem answers, and no Python code can interrupt it; so does ``close``, which on FUSE
waits for the daemon's FLUSH. On the event loop's default executor, ``min(32, cpus + 4)``
such descriptors would wedge every ``to_thread`` of the broker; on the event loop itself, one
``close`` would freeze it. So every copy from or to a peer's descriptor, and every close of
one, runs here:

- **Bounded.** At most ``threads`` copies at once; a job waits at most ``wait_seconds`` for a
  free thread, then ``BUSY``. A copy whose caller gave up (its deadline passed, the client
  left) keeps its thread until the kernel returns (*abandoned*); when every thread is held
  that way, waiting jobs get BUSY at once and the fast path refuses new hand-overs: clients
  stream. Closes have as many threads of their own; while they are all busy the socket
  refuses hand-overs without receiving their descriptors.
- **Own descriptors.** A copy works on duplicates it closes itself, so the job may close the
  originals (and their numbers be reused) while an abandoned copy is still blocked.
- **Daemon threads**, unlike ``ThreadPoolExecutor``'s, which the interpreter joins at exit: a
  thread blocked for ever must not keep the broker from exiting.
- **Deadlines.** The caller's ``watchdog`` says how long to wait now and raises when the
  copy is over its limit (the upload's pace, an output's size at the minimum rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from airlock_broker.daemon_pool import DaemonPool
from airlock_broker.errors import Reason, error
from airlock_broker.fastpath.peer_rights import close_disarmed, let_go

log = logging.getLogger(__name__)

T = TypeVar("T")

class PeerIO:
    """Copies from and to peer descriptors, and their closes (see the module docstring)."""

    def __init__(self, threads: int, wait_seconds: float) -> None:
        self.threads = threads
        self.wait_seconds = wait_seconds
        self._copies = DaemonPool(threads, "airlock-peer-io")
        self._closes = DaemonPool(threads, "airlock-peer-close")
        self._slots = asyncio.Semaphore(threads)
        #: Copies whose caller gave up while they were blocked (touched on the loop only).
        self._abandoned: set[Future[Any]] = set()
        self._closing = 0
        self._lock = threading.Lock()

    @property
    def abandoned(self) -> int:
        return len(self._abandoned)

    @property
    def copies_wedged(self) -> bool:
        """Every copy thread is held by a descriptor that stopped answering."""
        return len(self._abandoned) >= self.threads

    @property
    def closes_wedged(self) -> bool:
        """Every close thread is busy: receiving more descriptors could only queue closes."""
        return self._closing >= self.threads

    async def run(self, fn: Callable[..., T], fds: Sequence[int],
                  watchdog: Callable[[], float]) -> T:
        """``fn(*duplicates of fds)`` on a copy thread. ``watchdog()`` is called before each
        wait: it returns how long to wait, or raises to give up (the thread carries on alone,
        and closes its duplicates when the kernel lets it)."""
        loop = asyncio.get_running_loop()
        await self._acquire(loop)
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
            future: Future[T] = self._copies.submit(_owning, fn, dups)
        except BaseException:
            self._slots.release()
            self.close_later(dups)
            raise

        def finished(_: Future[T]) -> None:  # on the copy thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to release
                loop.call_soon_threadsafe(self._release, future)

        future.add_done_callback(finished)
        waiter = asyncio.wrap_future(future, loop=loop)
        try:
            while True:
                left = watchdog()
                done, _ = await asyncio.wait({waiter}, timeout=left)
                if done:
                    return waiter.result()
        except BaseException:
            if not future.done():
                self._abandoned.add(future)
                log.warning("a same-host copy was given up while blocked in the kernel; its "
                            "thread stays until the peer's filesystem answers (%d of %d held)",
                            self.abandoned, self.threads)
            waiter.add_done_callback(_retrieve)
            raise

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> None:
        """A copy thread within ``wait_seconds``, else BUSY; at once BUSY when every thread is
        held by a stalled descriptor (those do not come back on any schedule)."""
        deadline = loop.time() + self.wait_seconds
        while not self.copies_wedged:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(min(left, 0.5)):  # not wait_for: see pools.py
                    await self._slots.acquire()
                return
            except TimeoutError:
                continue
        raise error(Reason.BUSY, f"all {self.threads} threads for same-host transfers are "
                    f"busy ({self.abandoned} held by descriptors that stopped answering); "
                    "retry, or stream")

    def _release(self, future: Future[Any]) -> None:
        self._slots.release()
        self._abandoned.discard(future)

    def close_later(self, fds: Sequence[int]) -> None:
        """Close ``fds`` on a close thread: never blocks the caller."""
        if fds:
            held = list(fds)
            # A lingering socket closes at once (peer_rights).
            self._on_close_thread(lambda: close_disarmed(held))

    def let_go_later(self, conn: socket.socket, then: Callable[[], None]) -> None:
        """``peer_rights.let_go(conn)`` on a close thread, then ``then()`` there: a
        connection whose peer may have queued descriptors (a kernel before 6.16) is closed
        where its close may wait."""
        self._on_close_thread(lambda: let_go(conn), then)

    def _on_close_thread(self, close: Callable[[], None],
                         then: Callable[[], None] | None = None) -> None:
        """``close()`` on a close thread, counted (``closes_wedged``) until it returns; then
        ``then()`` there."""
        def run() -> None:
            try:
                close()
            finally:
                with self._lock:
                    self._closing -= 1
                if then is not None:
                    then()

        with self._lock:
            self._closing += 1
        self._closes.run_anyway(run)

    def shutdown(self) -> None:
        """Stop taking work; threads blocked in the kernel are left to the process's exit."""
        self._copies.shutdown(wait=False)
        self._closes.shutdown(wait=False)


def _owning(fn: Callable[..., T], fds: list[int]) -> T:
    try:
        return fn(*fds)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _retrieve(waiter: asyncio.Future[Any]) -> None:
    """A copy nobody waits for any more: its outcome is dropped (not logged as unretrieved)."""
    if not waiter.cancelled():
        waiter.exception()
