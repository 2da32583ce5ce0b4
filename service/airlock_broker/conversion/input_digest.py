"""The sha256 of a spooled artifact: known when it arrived, or computed while its job runs.

The gRPC stream hashes each chunk as it comes (the network is the slower side). The same-host
fast path copies at memory speed, where SHA-256 (one core, about 1.7 GB/s on this machine)
would double the copy's time if the copy waited for it. So the hash follows the copy on a
thread of its own, reading back from the broker's spool file each block the copy has written
(from the page cache, or as zeros for a block the copy left a hole), and goes on after the
copy has ended, while the sandboxes read the same file. The bytes hashed are the bytes
converted: the same inode, which nothing writes once spooled (the broker's private directory
outside, a read-only mount in each sandbox), never the caller's file, which it may change at
any time.

What needs the digest awaits it: the result header and the provenance it signs (jobs.py, at
the very end, and before a delivered output is committed), an idempotency key seen before
(idempotency.py), a declared sha256 (before any sandbox starts), the audit record (set when
known; a failed job waits for it before its record is written, a cancelled one stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable

from airlock_broker.errors import Reason, error
from airlock_broker.futures import retrieved

#: Read per step of the hash: the step at which ``close`` is noticed.
STEP_BYTES = 1024 * 1024
#: What a hole hashes as, a step at a time (one copy for every job).
_ZEROS = memoryview(bytes(STEP_BYTES))


class InputDigest:
    """One artifact's sha256, possibly still being computed. Owned by its call: ``close``."""

    def __init__(self, future: asyncio.Future[str], feed: HashFeed | None = None) -> None:
        self._future = future
        self._feed = feed
        # A hash given up with a copy that failed is awaited by no one: not an error to log.
        future.add_done_callback(retrieved)

    @classmethod
    def known(cls, sha256: str, declared: str = "") -> InputDigest:
        """A digest computed as the bytes arrived; CHECKSUM_MISMATCH unless it is ``declared``
        (when the caller declared one)."""
        _check(sha256, declared)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(sha256)
        return cls(future)

    @classmethod
    def following(cls, fd: int, declared: str = "") -> tuple[InputDigest, HashFeed]:
        """A hash of the spool file ``fd`` (which this owns and closes) that follows its
        copy: the copy reports each block through the ``HashFeed``, then the end. On a
        thread of its own (a 16 GiB input takes about 10 s: not a place in the loop's shared
        executor). Its value is CHECKSUM_MISMATCH unless it is ``declared`` (when given)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        feed = HashFeed()

        def run() -> None:
            try:
                outcome: Callable[[], None] = functools.partial(
                    _settle, future, _follow(fd, feed, declared), None)
            except BaseException as exc:  # handed to whoever awaits it
                outcome = functools.partial(_settle, future, "", exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(outcome)

        try:
            threading.Thread(target=run, name="airlock-input-hash", daemon=True).start()
        except BaseException:
            os.close(fd)
            raise
        return cls(future, feed), feed

    @property
    def hex_or_pending(self) -> str:
        """For a log line: the digest, or that it is still being computed."""
        return self._future.result() if _succeeded(self._future) else "(hashing)"

    async def value(self) -> str:
        """The sha256 (raises what the hash raised: CHECKSUM_MISMATCH, or CANCELLED after
        ``close``). Cancelling the caller does not cancel the hash: others may await it."""
        return await asyncio.shield(self._future)

    async def settled(self) -> str | None:
        """The sha256, or None when the hash failed or was given up."""
        await asyncio.wait({self._future})
        return self._future.result() if _succeeded(self._future) else None

    def when_known(self, callback: Callable[[str], None]) -> None:
        """``callback(sha256)`` on the event loop once the hash succeeds (never otherwise)."""
        def done(future: asyncio.Future[str]) -> None:
            if _succeeded(future):
                callback(future.result())
        self._future.add_done_callback(done)

    def close(self) -> None:
        """The call no longer needs it: the thread stops at its next step and closes its
        descriptor (``settled`` then returns promptly)."""
        if self._feed is not None:
            self._feed.give_up()


class HashFeed:
    """What the copy tells the hash that follows it (thread-safe): each block, in order,
    then the end; or that it failed (``give_up``: the hash stops)."""

    def __init__(self) -> None:
        self._blocks: queue.SimpleQueue[tuple[int, int, bool] | int | None] = \
            queue.SimpleQueue()
        self.stopped = threading.Event()

    def wrote(self, offset: int, length: int, *, hole: bool = False) -> None:
        """``length`` bytes at ``offset`` are in the file (``hole``: all zero, not written)."""
        self._blocks.put((offset, length, hole))

    def finished(self, size: int) -> None:
        """The copy ended: the file holds ``size`` bytes, every one reported."""
        self._blocks.put(size)

    def give_up(self) -> None:
        self.stopped.set()
        self._blocks.put(None)

    def next(self) -> tuple[int, int, bool] | int | None:
        """The next report (blocking): a block, the final size, or None when given up."""
        item = self._blocks.get()
        return None if self.stopped.is_set() else item


def _succeeded(future: asyncio.Future[str]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _settle(future: asyncio.Future[str], sha256: str, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(sha256)


def _check(sha256: str, declared: str) -> None:
    if declared and sha256 != declared:
        raise error(Reason.CHECKSUM_MISMATCH,
                    "the artifact's sha256 does not match the declared one")


def _follow(fd: int, feed: HashFeed, declared: str) -> str:
    """Blocking: the sha256 of what ``feed`` reports of ``fd``, read at explicit offsets."""
    try:
        digest = hashlib.sha256()
        # Sized to need: most inputs are a few kB, and each job's hash is a thread of its
        # own, whose freed buffers the allocator's per-thread arenas would keep.
        buffer = bytearray(0)
        hashed = 0
        while True:
            item = feed.next()
            if item is None:
                raise error(Reason.CANCELLED, "the input's hash was given up with its call")
            if isinstance(item, int):  # the end
                if item != hashed:
                    raise error(Reason.INTERNAL, f"the copy reported {hashed} of its {item} "
                                                 "bytes to the input's hash")
                break
            offset, length, hole = item  # a hole reads as zeros: the spool file is new
            if offset != hashed:
                raise error(Reason.INTERNAL, f"the copy reported the block at {offset} "
                                             f"after {hashed} bytes")
            end = offset + length
            while hashed < end:
                if feed.stopped.is_set():
                    raise error(Reason.CANCELLED, "the input's hash was given up with its call")
                want = min(STEP_BYTES, end - hashed)
                if hole:  # want <= STEP_BYTES, the length of _ZEROS
                    digest.update(_ZEROS[:want])
                    hashed += want
                    continue
                if len(buffer) < want:
                    buffer = bytearray(want)
                n = os.preadv(fd, [memoryview(buffer)[:want]], hashed)
                if n == 0:  # the broker's own file cannot shrink; if it did, nothing holds
                    raise error(Reason.INTERNAL, f"the spooled input ended at {hashed} bytes "
                                                 f"while it was hashed ({end} written)")
                digest.update(memoryview(buffer)[:n])  # releases the GIL
                hashed += n
        sha256 = digest.hexdigest()
        _check(sha256, declared)
        return sha256
    finally:
        os.close(fd)
