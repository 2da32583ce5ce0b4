"""The sha256 of a spooled artifact: known when it arrived, or computed while its job runs.

The gRPC stream hashes each chunk as it comes (the network is the slower side). The same-host
fast path copies at memory speed, where SHA-256 (one core, about 1.7 GB/s on this machine)
would double the copy's time; so it copies first and then hashes the broker's own spool copy
on a thread while the sandboxes read it. The bytes hashed are the bytes converted: the same
inode, which nothing writes once spooled (the broker's private directory outside, a read-only
mount in each sandbox), never the caller's file, which it may change at any time.

What needs the digest awaits it: the result header and the provenance it signs (jobs.py, at
the very end), an idempotency key seen before (idempotency.py), the audit record (set when
known; a failed job waits for it before its record is written, a cancelled one stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable

from airlock_broker.errors import Reason, error

#: Read per step of the hash: the step at which ``close`` is noticed.
STEP_BYTES = 1024 * 1024


class InputDigest:
    """One artifact's sha256, possibly still being computed. Owned by its call: ``close``."""

    def __init__(self, future: asyncio.Future[str], stop: threading.Event | None = None) -> None:
        self._future = future
        self._stop = stop

    @classmethod
    def known(cls, sha256: str, declared: str = "") -> InputDigest:
        """A digest computed as the bytes arrived; CHECKSUM_MISMATCH unless it is ``declared``
        (when the caller declared one)."""
        _check(sha256, declared)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(sha256)
        return cls(future)

    @classmethod
    def of_spool(cls, fd: int, size: int, declared: str = "") -> InputDigest:
        """Start hashing the first ``size`` bytes of the spool file ``fd`` (which this owns
        and closes) on a thread of its own (a 16 GiB input takes about 10 s: not a place in
        the loop's shared executor); its value is CHECKSUM_MISMATCH unless it is
        ``declared`` (when the caller declared one)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        stop = threading.Event()

        def run() -> None:
            try:
                outcome: Callable[[], None] = functools.partial(
                    _settle, future, _hash_file(fd, size, declared, stop), None)
            except BaseException as exc:  # handed to whoever awaits it
                outcome = functools.partial(_settle, future, "", exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(outcome)

        try:
            threading.Thread(target=run, name="airlock-input-hash", daemon=True).start()
        except BaseException:
            os.close(fd)
            raise
        return cls(future, stop)

    @property
    def hex_or_pending(self) -> str:
        """For a log line: the digest, or that it is still being computed."""
        if self._future.done() and not self._future.cancelled() \
                and self._future.exception() is None:
            return self._future.result()
        return "(hashing)"

    async def value(self) -> str:
        """The sha256 (raises what the hash raised: CHECKSUM_MISMATCH, or CANCELLED after
        ``close``). Cancelling the caller does not cancel the hash: others may await it."""
        return await asyncio.shield(self._future)

    async def settled(self) -> str | None:
        """The sha256, or None when the hash failed or was given up."""
        await asyncio.wait({self._future})
        if self._future.cancelled() or self._future.exception() is not None:
            return None
        return self._future.result()

    def when_known(self, callback: Callable[[str], None]) -> None:
        """``callback(sha256)`` on the event loop once the hash succeeds (never otherwise)."""
        def done(future: asyncio.Future[str]) -> None:
            if not future.cancelled() and future.exception() is None:
                callback(future.result())
        self._future.add_done_callback(done)

    def close(self) -> None:
        """The call no longer needs it: the thread stops at its next step and closes its
        descriptor (``settled`` then returns promptly)."""
        if self._stop is not None:
            self._stop.set()


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


def _hash_file(fd: int, size: int, declared: str, stop: threading.Event) -> str:
    """Blocking: the sha256 of ``fd``'s first ``size`` bytes, read at explicit offsets."""
    try:
        digest = hashlib.sha256()
        buffer = bytearray(min(STEP_BYTES, max(size, 1)))
        view = memoryview(buffer)
        offset = 0
        while offset < size:
            if stop.is_set():
                raise error(Reason.CANCELLED, "the input's hash was given up with its call")
            n = os.preadv(fd, [view[:size - offset]], offset)
            if n == 0:  # the broker's own file cannot shrink; if it did, nothing is vouched for
                raise error(Reason.INTERNAL, f"the spooled input ended at {offset} of its "
                                             f"{size} bytes while it was hashed")
            digest.update(view[:n])  # releases the GIL: the event loop runs meanwhile
            offset += n
        sha256 = digest.hexdigest()
        _check(sha256, declared)
        return sha256
    finally:
        os.close(fd)
