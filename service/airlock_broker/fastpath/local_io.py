"""Moving bytes through a peer's descriptors (the same-host fast path): in and out.

Both directions run on the fast path's own threads (``PeerIO``), never on the event loop or
its default executor: a peer's file may be on a filesystem that stops answering, and a thread
blocked in its read cannot be interrupted. The event loop side (``spool_from_peer``,
``write_to_peer``) bounds each copy with a deadline and gives up at it; the thread finishes
alone and closes its own duplicates of the descriptors.

Accesses to a peer's descriptor use explicit offsets (``preadv`` here, the writes of
conversion/file_copy.py): the peer shares the open file description and could move its offset
under us at any time.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.file_copy import BLOCK_BYTES
from airlock_broker.conversion.input_digest import HashFeed, InputDigest
from airlock_broker.conversion.intake import IntakeLimits, Spooled, check_size
from airlock_broker.conversion.spool_space import SpoolClaim, SpoolWriter
from airlock_broker.conversion.upload_limits import MiB, Pace
from airlock_broker.errors import Reason, error
from airlock_broker.fastpath.local_handles import LocalFiles, PeerCred
from airlock_broker.security.caller_disk import writing_as
from airlock_sandbox.formats import PREFIX_BYTES


@dataclass(frozen=True)
class Copied:
    """A peer's input as spooled (``spool_from_fd``), before its hash."""

    size: int
    prefix: bytes
    data_bytes: int


@dataclass
class ReadProgress:
    """What the spooling thread tells its watchdog on the event loop, and back."""

    received: int = 0
    last: float = field(default_factory=time.monotonic)  # when a read last returned
    #: Set by the watchdog's side when it gave up: the thread stops at its next block.
    stop: threading.Event = field(default_factory=threading.Event)


async def spool_from_peer(local: LocalFiles, dst: int, meta: pb.ConvertMetadata,
                          limits: IntakeLimits, *, in_ram: bool = False,
                          owner: str = "") -> Spooled:
    """The peer's input into the spool file ``dst`` (which this closes), on a thread of the
    fast path's own, within the upload's pace and idle timeout, and the spool's reserve.

    The room claimed up front is what the input really occupies (``st_blocks``), not its
    length: its holes stay holes in the spool (spool_space.py). ``in_ram``: the spool file
    is on the RAM spool, its declared size claimed there (input_room.py): nothing is
    claimed on the disk, and it is written whole (no holes: spool_space.SpoolWriter).
    """
    progress = ReadProgress()
    pace: Pace | None = None

    def watchdog() -> float:
        nonlocal pace
        if pace is None:
            pace = limits.pace()  # the thread has just started: the upload starts now
        left = pace.check(progress.received)
        idle = limits.idle_seconds - (time.monotonic() - progress.last)
        if idle <= 0:
            raise error(Reason.DEADLINE_EXCEEDED, "reading the input descriptor made no "
                                                  f"progress for {limits.idle_seconds:g} s")
        return min(left, idle)

    claim: SpoolClaim | None = None
    try:
        if not in_ram:
            claim = limits.claim(min(local.input.size, local.input.allocated), owner=owner)
        # Hashed from the broker's own copy, behind it and then while the job runs: the
        # bytes converted, through a descriptor that can only read them.
        digest, feed = InputDigest.following(read_only(dst), meta.sha256)
        try:
            copied = await local.io.run(
                lambda src, spool: spool_from_fd(src, spool, meta, limits, progress, claim,
                                                 holes=not in_ram, feed=feed),
                (local.input_fd, dst), watchdog)
        except BaseException:
            digest.close()
            raise
        return Spooled(size=copied.size, prefix=copied.prefix, data_bytes=copied.data_bytes,
                       digest=digest)
    finally:
        progress.stop.set()
        if claim is not None:
            claim.release()
        os.close(dst)  # the thread, if still blocked, has its own duplicate


async def write_to_peer(local: LocalFiles, write: Callable[..., None], size: int,
                        limits: IntakeLimits, *sources: int) -> None:
    """``write(output, *sources)`` into the peer's output descriptor on a thread of the fast
    path's own (duplicates of each), within the grace period plus ``size`` at the upload's
    minimum rate: a file that takes longer is on a filesystem that stopped answering. The
    thread writes with the peer's claim on that disk, not root's (security/caller_disk.py):
    its quota, and no block its filesystem keeps for root."""
    rate = limits.upload.min_bytes_per_second or MiB
    seconds = limits.upload.grace_seconds + size / rate
    deadline = time.monotonic() + seconds

    def watchdog() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise error(Reason.DEADLINE_EXCEEDED,
                        f"writing the {size}-byte output into the caller's file took over "
                        f"{seconds:.0f} s: its filesystem is too slow or stopped answering")
        return left

    try:
        await local.io.run(functools.partial(_as_peer, local.peer, write),
                           (local.output_fd, *sources), watchdog)
    except OSError as exc:
        raise error(Reason.LOCAL_WRITE_FAILED,
                    f"writing the {size}-byte output into the caller's file failed: "
                    f"{exc.strerror or exc} (the conversion succeeded; free space on that "
                    "filesystem, or give a writable file, and convert again)") from exc


def _as_peer(peer: PeerCred, write: Callable[..., None], *fds: int) -> None:
    with writing_as(peer.uid, peer.gid):
        write(*fds)


def read_only(fd: int) -> int:
    """A new descriptor of the broker's own file ``fd`` that can only read it: the same inode,
    reopened through the process's own descriptor table (not a path someone could swap)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def spool_from_fd(src: int, dst: int, meta: pb.ConvertMetadata, limits: IntakeLimits,
                  progress: ReadProgress | None = None,
                  claim: SpoolClaim | None = None, *, holes: bool = True,
                  feed: HashFeed | None = None) -> Copied:
    """Copy the peer's input into the spool file ``dst``. Blocking: a thread's.

    Not hashed here: SHA-256 is twice as slow as this copy, which does not wait for it; each
    block written is reported to the hash that follows it (``feed``, input_digest.py), which
    goes on while the job runs. Bounded like the gRPC path:
    the declared size or ``max_artifact_bytes``; in time by the caller's watchdog
    (``progress``), which a read that never returns cannot reach. All-zero blocks stay holes
    (unless not ``holes``: the RAM spool, spool_space.SpoolWriter), and what is written is
    accounted against the spool's reserve (``claim``).
    """
    cap = min(meta.size_bytes or limits.max_artifact_bytes, limits.max_artifact_bytes)
    progress = progress or ReadProgress()
    spool = SpoolWriter(dst, claim, holes=holes)
    prefix = b""
    size = 0
    raw = bytearray(BLOCK_BYTES)
    while True:
        try:
            n = os.preadv(src, [raw], size)
        except OSError as exc:  # the peer's file: its errors are the caller's to see
            raise error(Reason.LOCAL_FD_REFUSED,
                        f"reading the input descriptor failed after {size} bytes: "
                        f"{exc.strerror or exc}; stream the file instead") from exc
        progress.last = time.monotonic()
        if progress.stop.is_set():
            raise error(Reason.CANCELLED, "the upload was given up")
        if not n:
            break
        if size + n > cap:
            what = "declared size" if meta.size_bytes else "server maximum"
            raise error(Reason.TOO_LARGE, f"artifact exceeds the {what} of {cap} bytes")
        if len(prefix) < PREFIX_BYTES:
            prefix += bytes(raw[: min(n, PREFIX_BYTES - len(prefix))])
        written = spool.write(raw if n == BLOCK_BYTES else raw[:n], size)
        if feed is not None:
            feed.wrote(size, n, hole=not written)
        size += n
        progress.received = size
    spool.finish(size)
    check_size(size, meta)
    if feed is not None:
        feed.finished(size)
    return Copied(size=size, prefix=prefix, data_bytes=spool.data_bytes)
