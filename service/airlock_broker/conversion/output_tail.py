"""Hashing an output while its sandbox writes it, instead of after.

S3's serial path used to end in the output's sha256: 0.3 s for 400 MiB (1.4 GB/s), which
began when the sandbox that wrote the file for 0.3 s was dead. Here the two overlap. Before
the job the broker makes the output file, empty and append-only
(``SandboxBackend.append_only_output``, under runc), and a thread of its own follows it:
whatever lies below the file's size can no longer change, since the kernel lets nobody write
anywhere but at the end of an append-only file, truncate it, map it writable, rename or
remove it. So every byte is hashed as soon as it is there. Once the sandbox is dead,
``finish`` reads the rest to the end; the digest is then of the whole file, as it stays.

That digest is of the file's raw bytes. It is the output's answer digest only when the file
validation describes is this one (same inode, same size) and already canonical (its header
is the canonical header: the reading writes it so, airlock_worker.extract_safetensors). Any
other file is hashed after validation, as every output was before (``OutputTail.digest_of``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from dataclasses import dataclass

from airlock_broker.conversion.outputs import ValidatedOutput, compute_digest, with_sha256

log = logging.getLogger(__name__)

_BLOCK_BYTES = 1024 * 1024
#: How long the thread waits for more bytes: from the first, doubling up to the longest (a
#: reading spends a while in the checkpoint's structure before it writes).
_FIRST_PAUSE_S = 0.001
_LONGEST_PAUSE_S = 0.02


@dataclass(frozen=True)
class Followed:
    """What the followed file held when its sandbox was dead."""

    size: int
    sha256: str
    device: int
    inode: int


class OutputTail:
    """Follows one append-only output by its descriptor (which it owns and ``close`` closes)
    in a thread of its own, a job's worth at most: not the event loop's executor, whose few
    threads validation and copies need meanwhile."""

    def __init__(self, fd: int, cap: int) -> None:
        self._fd = fd
        #: More than this many bytes (the job's output cap) and the file is not followed on.
        self._cap = cap
        self._dead = threading.Event()  # the sandbox is dead: read to the end and stop
        self._abandoned = False
        #: How many bytes are hashed so far (set by the thread; read anywhere).
        self.hashed = 0
        self._result: asyncio.Future[Followed | None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Followed | None] = loop.create_future()
        self._result = result

        def settle(value: Followed | None, exc: BaseException | None) -> None:
            if result.done():
                return
            if exc is None:
                result.set_result(value)
            else:
                result.set_exception(exc)

        def run() -> None:
            value, exc = None, None
            try:
                value = self._follow()
            except BaseException as caught:  # reported to the awaiting task
                exc = caught
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits it
                loop.call_soon_threadsafe(settle, value, exc)

        try:
            threading.Thread(target=run, name="airlock-output-tail", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: nothing is followed
            result.set_exception(OSError(f"cannot start the tail's thread: {exc}"))

    async def finish(self) -> Followed | None:
        """Only once nothing in the sandbox runs: the digest of the whole file, or None if
        it ran past the cap (validation then refuses it), could not be read, or the tail is
        closed (its job is over)."""
        result = self._result
        if result is None:
            return None
        self._dead.set()
        try:
            return await asyncio.shield(result)
        except OSError as exc:
            log.warning("following the output failed (it is hashed after validation): %s", exc)
            return None

    async def close(self) -> None:
        """Stop following and close the descriptor once the thread is done (one block at
        most): awaited here, or, if this is cancelled meanwhile, when it is. Idempotent."""
        self._abandoned = True
        self._dead.set()
        result, self._result = self._result, None
        if result is None:
            self._close_fd()
            return
        result.add_done_callback(self._thread_done)
        await asyncio.wait({result})

    def _thread_done(self, result: asyncio.Future[Followed | None]) -> None:
        if not result.cancelled():
            result.exception()  # retrieved: a failure was logged by ``finish``, or is moot
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    async def digest_of(self, output: ValidatedOutput, followed: Followed | None
                        ) -> tuple[ValidatedOutput, bool]:
        """``output`` with its sha256: the followed file's (``finish``), when ``output`` is
        that file and canonical as it lies; otherwise computed now. The second item: whether
        it was the followed file's. Before ``close``."""
        info = output.safetensors
        if (followed is not None and info is not None and self._fd >= 0
                and (info.source.device, info.source.inode) == (followed.device, followed.inode)
                and info.source.size == followed.size == info.canonical_size):
            header = info.canonical_header  # a few KiB from the page cache (16 MiB at most)
            if os.pread(self._fd, len(header), 0) == header:
                return with_sha256(output, followed.sha256), True
        return await compute_digest(output), False

    def _follow(self) -> Followed | None:
        hasher = hashlib.sha256()
        buf = bytearray(_BLOCK_BYTES)
        view = memoryview(buf)
        offset, pause = 0, _FIRST_PAUSE_S
        while not self._abandoned:
            dead = self._dead.is_set()  # before the read: what it returns is then the end
            n = os.preadv(self._fd, [buf], offset)
            if n:
                offset += n
                if offset > self._cap:
                    return None
                hasher.update(view[:n])
                self.hashed = offset
                pause = _FIRST_PAUSE_S
                continue
            if dead:
                st = os.fstat(self._fd)
                if st.st_size != offset:  # cannot be, for an append-only file: not ours
                    return None
                return Followed(offset, hasher.hexdigest(), st.st_dev, st.st_ino)
            self._dead.wait(pause)
            pause = min(pause * 2, _LONGEST_PAUSE_S)
        return None


