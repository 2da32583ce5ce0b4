"""A validated output on its way to the caller: held by the broker, no longer by the sandbox.

Once validation passed, the output leaves the job's slot: its canonical bytes are written into
a file of the broker's, ``<spool>/results/<job_id>`` (0600, ``spool_answer``), and the run
slot and the job's sandboxes are released *before* the first byte goes to a caller that reads
them from the call (the dead containers and their output tmpfs are destroyed once the answer
is out, or at most ``[pools] defer_max_seconds`` after the release: ``Pools.release``). A
caller that reads slowly, or never (HTTP/2 flow control then holds the broker's writes),
holds no sandbox for longer than that: only its admission place and that file, and those only
for ``answer_drain_seconds`` (api/answer_drains.py); then the call ends with DEADLINE_EXCEEDED
and the file is removed. On the same-host fast path no caller's pace is involved: the broker
itself writes the caller's file, from the tmpfs (``Transfer.deliver``), within the time
``write_to_peer`` allows for the size, and makes a spool copy only for the idempotency store,
after the answer (``spool_answer``). With an idempotency key the idempotency store adopts the
spool file (no second copy), so a retry is answered from it: a stored answer is the same
``Answer`` (another header, the stored file), sent by the same code.

How an answer travels is its call's ``Transfer``: the request stream (``StreamTransfer``,
here), or on the same-host fast path the caller's own descriptors (fastpath/peer_transfer.py).
The same object brought the artifact in.

Why a copy on the spool, and not the tmpfs itself kept open after a lazy unmount (which would
copy nothing): the tmpfs is RAM. Every answer waiting for a slow reader would pin up to
``output_bytes`` (3 GiB by default) of it, for every admitted job instead of the running ones
only. The spool is disk, where the same admitted jobs' uploads lived a moment before (an
upload moves into its slot and goes with it). The copy is one kernel copy (``sendfile``
from the tmpfs), measured in the README's Performance section. An ONNX output was already in
the broker's memory (the validator's canonical bytes); written out, it is the page cache's to
keep or evict, not the broker's RSS while a caller dawdles.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.idempotency import Claim
from airlock_broker.conversion.intake import IntakeLimits, Spooled, spool_chunks
from airlock_broker.conversion.outputs import Delivery, PinnedOutput, ValidatedOutput
from airlock_broker.conversion.spool_space import SpoolClaim
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.sandboxes.workspace import remove_quietly, remove_soon, results_dir

log = logging.getLogger(__name__)

#: An ONNX output (canonical bytes in a file of the broker's, just written: page cache) up to
#: this size is copied to its answer file on the event loop; larger ones, and safetensors, on a
#: thread.
INLINE_WRITE_BYTES = 1024 * 1024


class Transfer(Delivery, Protocol):
    """How one call's artifact comes in and its answer goes out. ``close`` once."""

    @property
    def name(self) -> str:
        """"stream" or "local": the audit record's and the result header's ``transfer``."""
        ...

    @property
    def peer(self) -> Mapping[str, int] | None:
        """The caller's process as the kernel named it (the fast path), for the audit log."""
        ...

    async def receive(self, fd: int, meta: pb.ConvertMetadata, *,
                      in_ram: bool = False, owner: str = "") -> Spooled:
        """The artifact into the spool file ``fd`` (which this closes), with its digest
        (``Spooled.digest``: perhaps still being computed, input_digest.py). ``in_ram``:
        the file is on the RAM spool, its declared size claimed there (input_room.py), so the
        disk's reserve is not charged. ``owner``: the caller (``Principal.quota``), whose
        claims on the disk share ``[upload] spool_share_per_caller``."""
        ...

    def send(self, answer: Answer) -> AsyncIterator[pb.ConvertResponse]:
        """The answer's messages: the header, and the output wherever this transfer puts it
        (unless ``answer.delivered``)."""
        ...

    def close(self) -> None:
        ...


@dataclass(eq=False)
class StreamTransfer:
    """The artifact in the request's chunks, the output in the response's."""

    requests: AsyncIterator[pb.ConvertRequest]
    limits: IntakeLimits
    chunk_bytes: int
    name: str = "stream"
    peer: Mapping[str, int] | None = None

    async def receive(self, fd: int, meta: pb.ConvertMetadata, *,
                      in_ram: bool = False, owner: str = "") -> Spooled:
        return await spool_chunks(self.requests, fd, meta, self.limits, in_ram=in_ram,
                                  owner=owner)

    async def deliver(self, output: ValidatedOutput, *, pending: bool = False) -> bool:
        return False  # the caller reads at its own pace: from the spool copy, never the slot

    async def commit(self, output: ValidatedOutput) -> None:
        pass  # nothing was delivered

    async def retract(self) -> None:
        pass  # nothing was delivered

    async def send(self, answer: Answer) -> AsyncIterator[pb.ConvertResponse]:
        yield pb.ConvertResponse(result=answer.result)
        fd = answer.fd
        assert fd is not None  # never delivered: its copy is kept
        offset = 0
        while offset < answer.size:
            # Page-cache reads of a file only the broker writes; explicit offsets.
            data = os.pread(fd, min(self.chunk_bytes, answer.size - offset), offset)
            if not data:
                raise error(Reason.INTERNAL, f"the answer file ended at {offset} of "
                                             f"{answer.size} bytes")
            offset += len(data)
            yield pb.ConvertResponse(chunk=pb.Chunk(data=data, crc32=zlib.crc32(data)))

    def close(self) -> None:
        pass


@dataclass(eq=False)
class Answer:
    """A result header and the output's bytes in a descriptor the broker owns, fresh or
    stored, and the transfer it goes by.

    ``close`` exactly once (``with answer:``); it does not close the transfer (its owner
    does, after). On the fast path the copy into the caller's file runs on the fast path's own
    threads, on duplicates of the descriptors (peer_io.py): closing the answer under a copy
    that is still running never hands its descriptor numbers to whatever the broker opens next.
    """

    result: pb.ConvertResult
    #: None: the output was delivered and no copy of it was kept (``spool_answer``).
    fd: int | None
    size: int
    transfer: Transfer
    #: The file's name while this answer owns it (removed on release); None when the
    #: idempotency store owns the name (or, for a stored answer, always).
    path: Path | None = None
    #: The output already is where the transfer puts it (``Transfer.deliver``): only the
    #: header is left to send.
    delivered: bool = False
    #: A delivered output, held open for the store's copy (made by ``store``, at ``path``).
    pinned: PinnedOutput | None = None
    _closed: bool = field(default=False, repr=False)

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.fd is not None:
            os.close(self.fd)
        if self.pinned is not None:  # never handed to the store: no file was made
            self.pinned.close()
        elif self.path is not None:
            remove_soon(self.path)  # an answer may be GiB: its unlink is off the loop

    def store(self, claim: Claim) -> None:
        """Offer the file to the idempotency store; if it takes it, the store owns the name.
        A delivered answer's file is not made yet: the store makes it, in the background,
        from the pinned output (a retry meanwhile waits for it)."""
        if self.path is None:
            return
        pinned = self.pinned
        write = None if pinned is None else functools.partial(_keep, self.path, pinned)
        if claim.store(self.result.SerializeToString(), self.path, self.size, write=write):
            self.path = self.pinned = None

    def responses(self) -> AsyncIterator[pb.ConvertResponse]:
        """The header, then the output (as chunks, or into the caller's own file: only now,
        nothing reached it before validation passed)."""
        self.result.transfer = self.transfer.name
        return self.transfer.send(self)


async def spool_answer(spool_root: Path, result: pb.ConvertResult, output: ValidatedOutput,
                       transfer: Transfer, *, kept: bool = True,
                       delivered: bool = False, room: SpoolClaim | None = None) -> Answer:
    """The answer to ``output``: the answer no longer needs the sandbox's tmpfs.

    When the transfer delivers the output at once (the same-host fast path writes the
    caller's file, ``Transfer.deliver``), it does so alone: the spool copy made beside it
    slowed it 3 to 10 times here (S3: 284 to 1090 ms for 400 MiB instead of 110 ms, fresh
    page-cache memory being what this machine is slowest at). The copy the idempotency store
    keeps (``kept``: a retry with the same key is answered from it) is then made after the
    answer, in the background: ``Answer.store`` hands it to the store with the output held
    open (``ValidatedOutput.pin``), so that it outlives the slot. ``delivered``: the
    transfer delivered it already, while the integrity comparison ran (jobs.py).

    Otherwise ``output`` is written into ``<spool>/results/<job_id>`` (a small ONNX output at
    once, else in a worker thread, by kernel copy for a safetensors data section), and the
    answer is sent from that file. If the caller is cancelled meanwhile, the file is removed
    once the thread is done with it.

    ``room``: the spool's room claimed for the answer, estimated before the job from its
    input's data; a file on the spool is claimed at its real size first: zero weights the
    input held as holes come back written. The answer's own file is then refused
    (SPOOL_FULL) if it does not fit; the store's copy of an answer delivered already is not
    kept (a retry converts again).
    """
    path = results_dir(spool_root) / result.job_id
    if delivered or await transfer.deliver(output):
        if kept and room is not None:
            kept = _room_for_copy(room, output.size, result.job_id)
        pinned = _pinned(output) if kept else None
        return Answer(result=result, fd=None, size=output.size, transfer=transfer,
                      delivered=True, pinned=pinned, path=path if pinned else None)
    if room is not None:
        room.expect(output.size)
    if output.safetensors is None and output.identity is None \
            and output.size <= INLINE_WRITE_BYTES:
        # A kernel copy between page-cache pages, well under a millisecond: cheaper than the
        # hop to a worker thread and back (2.6 ms median for S1, bench.profile).
        return Answer(result=result, fd=_write_output(path, output.write_into, output.size),
                      size=output.size, transfer=transfer, path=path)
    copy = asyncio.ensure_future(
        asyncio.to_thread(_write_output, path, output.write_into, output.size))
    try:
        fd = await asyncio.shield(copy)
    except BaseException:
        copy.add_done_callback(lambda done: _discard(done, path))
        raise
    return Answer(result=result, fd=fd, size=output.size, transfer=transfer, path=path)


def _room_for_copy(room: SpoolClaim, size: int, job_id: str) -> bool:
    """Whether the store's copy of a delivered answer fits above the spool's reserve."""
    try:
        room.expect(size)
    except AirlockError as exc:
        log.warning("job %s: its answer is not kept for retries: %s", job_id, exc.message,
                    extra={"job_id": job_id})
        return False
    return True


def _write_output(path: Path, write_into: Callable[[int], None], size: int) -> int:
    """A new 0600 file holding exactly the output: its descriptor, open for reading."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_into(fd)
        written = os.fstat(fd).st_size
        if written != size:
            raise error(Reason.INTERNAL,
                        f"wrote {written} bytes of a {size}-byte output to the spool")
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    return fd


def _pinned(output: ValidatedOutput) -> PinnedOutput | None:
    """``output.pin()``; None (a retry will convert again) if that fails: the answer is
    delivered, only the store's copy was at stake."""
    try:
        return output.pin()
    except (AirlockError, OSError) as exc:
        log.warning("a delivered answer cannot be kept for retries: %s", exc)
        return None


def _keep(path: Path, pinned: PinnedOutput) -> None:
    """The store's copy of a delivered answer (on a worker thread)."""
    try:
        os.close(_write_output(path, pinned.write_into, pinned.size))
    finally:
        pinned.close()


def _discard(done: asyncio.Future[int], path: Path) -> None:
    if done.cancelled() or done.exception() is not None:
        return  # _write_output cleaned up after itself
    os.close(done.result())
    remove_soon(path)
