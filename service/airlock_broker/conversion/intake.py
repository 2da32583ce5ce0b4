"""Reading a Convert request stream: metadata first, then checksummed chunks to disk.

The artifact is written to the job's private spool file while it is hashed; it is never held
whole in memory. Every way a stream can be wrong ends in a ``Rejected`` with a reason, and the
caller's ``finally`` removes whatever was written.

An upload holds an admission place, so it is bounded in time as well as size: the metadata
must come within the grace period, and the chunks at the minimum average rate within the
total deadline (``Pace``, upload_limits.py); a client that stops sending is cut off at the
moment it falls behind. Its spool file is accounted against the spool's free-space reserve
and keeps all-zero chunks as holes (spool_space.py).

Each chunk's hash and write run on a thread of the uploads' own (``IntakeLimits.writers``)
while the event loop takes the next chunk: a write that the kernel holds back (dirty pages
throttled behind a slow disk) stalls the uploads, never every other call the loop serves nor
what else waits for the default executor. One chunk is in flight at a time, so the hash sees
them in order. The spool file is closed (and its room released) only once its thread is
done with it: at once, or, for an upload that ends while a write is in flight (refused,
cancelled), when that write returns; the call itself never waits for a thread it cannot
stop (a disk that never takes the write would hold it, and the broker's shutdown, for ever).
A chunk's CRC is checked on the loop, as it arrives (a cheap pass), so a corrupt one is
refused at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.input_digest import InputDigest
from airlock_broker.conversion.spool_space import SpoolClaim, SpoolSpace, SpoolWriter
from airlock_broker.conversion.upload_limits import Pace, UploadLimits
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.futures import retrieved
from airlock_sandbox.formats import PREFIX_BYTES

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: Threads the broker's uploads hash and write their chunks on (``IntakeLimits.writers``):
#: more uploads than this at once take turns, chunk by chunk (a chunk is a millisecond or
#: two of work; these threads wait only when the disk holds writes back).
UPLOAD_WRITERS = 4


@dataclass(frozen=True)
class IntakeLimits:
    max_artifact_bytes: int
    max_chunk_bytes: int
    idle_seconds: float
    upload: UploadLimits = field(default_factory=UploadLimits)
    #: The spool's free-space reserve (None: not accounted, for spools in a test's tmp dir).
    space: SpoolSpace | None = None
    #: The threads chunks are hashed and written on (None: the loop's default executor).
    writers: Executor | None = None

    def pace(self) -> Pace:
        """The clock of one upload, started now."""
        return Pace(self.upload, self.max_artifact_bytes)

    def claim(self, expected: int, purpose: str = "this upload", *,
              owner: str = "") -> SpoolClaim | None:
        """Room on the spool for ``expected`` bytes (SPOOL_FULL if there is none), for the
        caller ``owner`` (spool_space.SpoolSpace.claim)."""
        return None if self.space is None else self.space.claim(expected, purpose,
                                                                  owner=owner)


@dataclass(frozen=True)
class Spooled:
    """What the broker knows about an artifact once it is on disk."""

    size: int
    prefix: bytes
    #: The bytes of its blocks that were not all zero (SpoolWriter.data_bytes).
    data_bytes: int
    #: Its sha256: known as it arrived, or computed while the job runs (input_digest.py).
    #: The call owns it: ``close`` when done.
    digest: InputDigest


async def read_metadata(stream: AsyncIterator[pb.ConvertRequest],
                        limits: IntakeLimits) -> pb.ConvertMetadata:
    """The first message must be the metadata, and only it (within the grace period)."""
    first = await _next(stream, min(limits.idle_seconds, limits.upload.grace_seconds))
    if first is None:
        raise error(Reason.BAD_REQUEST, "empty request stream: the first message must be metadata")
    if first.WhichOneof("payload") != "metadata":
        raise error(Reason.BAD_REQUEST, "the first message must be metadata, not a chunk")
    meta = first.metadata
    if meta.size_bytes > limits.max_artifact_bytes:
        raise error(Reason.TOO_LARGE, f"declared size {meta.size_bytes} bytes exceeds the "
                                      f"server maximum of {limits.max_artifact_bytes}")
    if meta.sha256 and not SHA256_HEX.fullmatch(meta.sha256):
        raise error(Reason.BAD_REQUEST, "sha256 must be 64 lower-case hex digits")
    return meta


async def spool_chunks(stream: AsyncIterator[pb.ConvertRequest], fd: int,
                       meta: pb.ConvertMetadata, limits: IntakeLimits, *,
                       in_ram: bool = False, owner: str = "") -> Spooled:
    """Write every chunk to ``fd`` (which this function closes), hashing as it goes.
    ``in_ram``: ``fd`` is on the RAM spool, its declared size claimed there (input_room.py):
    nothing is claimed on the disk, and it is written whole (spool_space.SpoolWriter).
    ``owner``: the caller, whose claims on the disk share a bound."""
    digest = hashlib.sha256()
    prefix = bytearray()
    size = 0
    cap = min(meta.size_bytes or limits.max_artifact_bytes, limits.max_artifact_bytes)
    pace = limits.pace()
    claim: SpoolClaim | None = None
    writing: asyncio.Future[None] | None = None  # the chunk on its worker thread
    try:
        if not in_ram:  # undeclared: checked as it grows
            claim = limits.claim(min(meta.size_bytes, cap), owner=owner)
        spool = SpoolWriter(fd, claim, holes=not in_ram)
        while (msg := await _next_chunk(stream, limits, pace, size)) is not None:
            if msg.WhichOneof("payload") != "chunk":
                raise error(Reason.BAD_REQUEST, "metadata may be sent only once, first")
            data = msg.chunk.data
            if len(data) > limits.max_chunk_bytes:
                raise error(Reason.BAD_REQUEST, f"chunk of {len(data)} bytes exceeds the "
                                                f"maximum of {limits.max_chunk_bytes}")
            if zlib.crc32(data) != msg.chunk.crc32:
                raise error(Reason.CHECKSUM_MISMATCH, f"chunk at offset {size} fails its CRC-32")
            size += len(data)
            if size > cap:
                what = "declared size" if meta.size_bytes else "server maximum"
                raise error(Reason.TOO_LARGE, f"artifact exceeds the {what} of {cap} bytes")
            if len(prefix) < PREFIX_BYTES:
                prefix += data[: PREFIX_BYTES - len(prefix)]
            if writing is not None:  # shielded: a cancellation must not end it, its thread runs on
                await asyncio.shield(writing)
            writing = asyncio.get_running_loop().run_in_executor(
                limits.writers, _take, data, size - len(data), digest, spool)
        if writing is not None:
            await asyncio.shield(writing)
        spool.finish(size)
    finally:
        _close_after(writing, fd, claim)
    check_size(size, meta)
    return Spooled(size=size, prefix=bytes(prefix), data_bytes=spool.data_bytes,
                   digest=InputDigest.known(digest.hexdigest(), meta.sha256))


def _take(data: bytes, offset: int, digest: hashlib._Hash, spool: SpoolWriter) -> None:
    """One chunk, on a writer thread: hashed, and written at ``offset``."""
    digest.update(data)
    spool.write(data, offset)


def _close_after(writing: asyncio.Future[None] | None, fd: int,
                 claim: SpoolClaim | None) -> None:
    """Close ``fd`` and release ``claim`` once the chunk in flight (``writing``) is written:
    now when there is none, else when it returns (its thread writes to ``fd``: closed under
    it, the number could be reused by the next open, and the write land there)."""
    def close(done: asyncio.Future[None] | None = None) -> None:
        if done is not None:
            retrieved(done)  # the upload has ended with its own outcome
        try:
            if claim is not None:
                claim.release()
        finally:
            os.close(fd)

    if writing is None or writing.done():
        close(writing)
    else:
        writing.add_done_callback(close)


def check_size(size: int, meta: pb.ConvertMetadata) -> None:
    """The spooled artifact's size is what the metadata declared (either transfer path); its
    declared sha256 is checked with its digest (input_digest.py)."""
    if size == 0:
        raise error(Reason.EMPTY_ARTIFACT, "the artifact is empty")
    if meta.size_bytes and size != meta.size_bytes:
        raise error(Reason.CHECKSUM_MISMATCH,
                    f"stream ended after {size} of {meta.size_bytes} declared bytes")


async def _next_chunk(stream: AsyncIterator[pb.ConvertRequest], limits: IntakeLimits,
                      pace: Pace, received: int) -> pb.ConvertRequest | None:
    """The next message, waiting no longer than the idle timeout or the moment the upload
    falls behind its pace (then UPLOAD_TOO_SLOW)."""
    left = pace.check(received)
    if left >= limits.idle_seconds:
        return await _next(stream, limits.idle_seconds)
    try:
        return await _next(stream, left)
    except AirlockError:  # the pace is what ran out: say so, with the numbers
        raise pace.error(received) from None


async def _next(stream: AsyncIterator[pb.ConvertRequest],
                seconds: float) -> pb.ConvertRequest | None:
    try:
        async with asyncio.timeout(seconds):  # not wait_for: see pools.py
            return await anext(stream)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise error(Reason.DEADLINE_EXCEEDED,
                    f"no data from the client for {seconds:g} s") from None
