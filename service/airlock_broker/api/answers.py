"""A validated output on its way to the caller: held by the broker, no longer by the sandbox.

Once validation passed, the output leaves the job's slot: its canonical bytes are written into
a file of the broker's, ``<spool>/results/<job_id>`` (0600, ``spool_answer``), and the run
slot and the job's sandboxes are released *before* the first byte goes to the caller (the
dead containers and their output tmpfs are destroyed once the answer is out, or at most
``[pools] defer_max_seconds`` after the release: ``Pools.release``). A caller that reads
slowly, or never (HTTP/2 flow control then holds the broker's writes), holds no sandbox for
longer than that: only its admission place and that file, and those only for
``answer_drain_seconds`` (``AnswerDrains``); then the call ends with DEADLINE_EXCEEDED and the
file is removed. With an idempotency key the idempotency store adopts the same file (no second
copy), so a retry is answered from it.

Why a copy on the spool, and not the tmpfs itself kept open after a lazy unmount (which would
copy nothing): the tmpfs is RAM. Every answer waiting for a slow reader would pin up to
``output_bytes`` (2 GiB) of it, for every admitted job instead of the running ones only. The
spool is disk, where the same admitted jobs' uploads lived a moment before (an upload moves
into its slot and goes with it). The copy is one kernel copy (``sendfile`` from the tmpfs),
measured in the README's Performance section. An ONNX output was already in the broker's
memory (the validator's canonical bytes); written out, it is the page cache's to keep or
evict, not the broker's RSS while a caller dawdles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.idempotency import Claim
from airlock_broker.conversion.intake import IntakeLimits
from airlock_broker.conversion.outputs import ValidatedOutput
from airlock_broker.errors import Reason, error
from airlock_broker.fastpath.local_handles import LocalFiles
from airlock_broker.fastpath.local_io import copy_file, write_to_peer
from airlock_broker.sandboxes.workspace import remove_quietly, results_dir

#: An ONNX output (canonical bytes in the broker's memory) up to this size is written to its
#: answer file on the event loop; larger ones, and safetensors (a kernel copy), on a thread.
INLINE_WRITE_BYTES = 1024 * 1024


@dataclass(eq=False)
class Answer:
    """A result header and the output's bytes in a descriptor the broker owns.

    ``close`` exactly once (``with answer:``). On the fast path the copy into the caller's file
    runs on the fast path's own threads, on duplicates of the descriptors (peer_io.py): closing
    the answer under a copy that is still running never hands its descriptor numbers to
    whatever the broker opens next.
    """

    result: pb.ConvertResult
    fd: int
    size: int
    #: The file's name while this answer owns it (removed on release); None when the
    #: idempotency store owns the name (or, for a replay, always).
    path: Path | None = None
    #: The caller's descriptors on the same-host fast path: owned, released with the answer.
    local: LocalFiles | None = None
    _closed: bool = field(default=False, repr=False)

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)
        if self.path is not None:
            remove_quietly(self.path)
        if self.local is not None:
            self.local.close()

    def keep(self, claim: Claim) -> None:
        """Offer the file to the idempotency store; if it takes it, the store owns the name."""
        if self.path is not None and claim.commit(self.result.SerializeToString(), self.path,
                                                  self.size):
            self.path = None

    async def responses(self, chunk_bytes: int,
                        limits: IntakeLimits) -> AsyncIterator[pb.ConvertResponse]:
        """The header, then the output: as chunks, or on the fast path into the caller's own
        file (only now: nothing reached it before validation passed, and within the time
        ``write_to_peer`` allows for its size), then the header alone."""
        if self.local is not None:
            size = self.size
            await write_to_peer(self.local, lambda out, src: copy_file(src, out, size), size,
                                limits, self.fd)
            self.result.transfer = "local"
            yield pb.ConvertResponse(result=self.result)
            return
        self.result.transfer = "stream"
        yield pb.ConvertResponse(result=self.result)
        offset = 0
        while offset < self.size:
            # Page-cache reads of a file only the broker writes; explicit offsets.
            data = os.pread(self.fd, min(chunk_bytes, self.size - offset), offset)
            if not data:
                raise error(Reason.INTERNAL, f"the answer file ended at {offset} of "
                                             f"{self.size} bytes")
            offset += len(data)
            yield pb.ConvertResponse(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))


async def spool_answer(spool_root: Path, result: pb.ConvertResult,
                       output: ValidatedOutput) -> Answer:
    """Write ``output`` into ``<spool>/results/<job_id>`` (a small ONNX output at once, else in
    a worker thread, by kernel copy for a safetensors data section): the answer no longer needs
    the sandbox's tmpfs.

    If the caller is cancelled meanwhile, the file is removed once the thread is done with it.
    """
    path = results_dir(spool_root) / result.job_id
    if output.safetensors is None and output.size <= INLINE_WRITE_BYTES:
        # Bytes already in memory, a page-cache write of well under a millisecond: cheaper
        # than the hop to a worker thread and back (2.6 ms median for S1, bench.profile).
        return Answer(result=result, fd=_write_output(path, output), size=output.size,
                      path=path)
    copy = asyncio.ensure_future(asyncio.to_thread(_write_output, path, output))
    try:
        fd = await asyncio.shield(copy)
    except asyncio.CancelledError:
        copy.add_done_callback(lambda done: _discard(done, path))
        raise
    return Answer(result=result, fd=fd, size=output.size, path=path)


def _write_output(path: Path, output: ValidatedOutput) -> int:
    """A new 0600 file holding exactly the output: its descriptor, open for reading."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        output.write_into(fd)
        written = os.fstat(fd).st_size
        if written != output.size:
            raise error(Reason.INTERNAL,
                        f"wrote {written} bytes of a {output.size}-byte output to the spool")
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    return fd


def _discard(done: asyncio.Future[int], path: Path) -> None:
    if done.cancelled() or done.exception() is not None:
        return  # _write_output cleaned up after itself
    os.close(done.result())
    remove_quietly(path)


class AnswerDrains:
    """The bound on how long an answer may take to reach its caller.

    When ``seconds`` pass before the last message is written (the caller reads too slowly or
    not at all), the call's handler task is cancelled: everything it holds (admission place,
    answer file, the caller's descriptors) is released at once. The caller is sent
    DEADLINE_EXCEEDED with the reason; gRPC can only deliver that status behind the messages
    already queued, so it is sent from a task of its own that ends when the caller reads on,
    goes away or hits its own deadline, or when the connection reaches its maximum age
    (``[rpc]``, rpc_limits.py) - whichever comes first.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        #: Abort tasks that outlive their handler (see above); held so they are not collected.
        self._aborts: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def deadline(self, context: grpc.aio.ServicerContext[Any, Any],
                 expired: Callable[[], grpc.Status]) -> Iterator[None]:
        """Arm the deadline for the answer sent inside this block (by the current task).

        ``expired`` is called once, on the event loop, when it passes: it records why and
        returns the status for the caller.
        """
        task = asyncio.current_task()
        assert task is not None, "an answer is sent from its RPC's task"
        loop = asyncio.get_running_loop()

        def expire() -> None:
            abort = loop.create_task(_abort(context, expired()), name="airlock-answer-abort")
            self._aborts.add(abort)
            abort.add_done_callback(self._aborts.discard)
            task.cancel()

        timer = loop.call_later(self.seconds, expire)
        try:
            yield
        finally:
            timer.cancel()


async def _abort(context: grpc.aio.ServicerContext[Any, Any],
                 status: grpc.Status) -> None:
    # AbortError when the status went out; an error when the call was gone first.
    with contextlib.suppress(Exception):
        await context.abort_with_status(status)
