"""A FUSE filesystem whose daemon answers enough to open a file, then never answers a read.

It plays the "network filesystem that hangs" a hostile (or merely unlucky) peer can hand the
broker on the same-host fast path: ``open`` succeeds; ``read``, and the FLUSH that every
``close`` sends, block in the kernel until the daemon answers, which this one never does
for other processes (this one's own FLUSH is answered; still, a test closes its files only
after ``close``: a close, and an open, can wait for the pages a stalled read holds locked).
Closing the daemon's end (``StallingFs.close``) aborts the connection: every blocked call then
fails (``ENOTCONN``), so a test never leaves a thread of anyone's blocked behind it. If the
test process dies, the kernel closes that end too - unless one of its own threads is blocked
on the filesystem: then ``echo 1 > /sys/fs/fuse/connections/<dev>/abort`` frees it.

``overlay_over`` puts a kernel overlay on top of it: a file there is on an ``overlay``
filesystem (what an allowlist sees) and still reads through to the stalled daemon.

The protocol is spoken directly on ``/dev/fuse`` (no libfuse, no ``fusermount``): the test
runs as root, as the broker does. Only what the kernel asks before a read is answered: INIT,
LOOKUP and GETATTR of one file, OPEN, and STATFS (so that ``df`` and the like, which ask every
mount, never hang on this one). Everything else gets ``ENOSYS``, except READ and the others'
FLUSH, which get nothing at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ext, pad
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes

LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE, FLUSH, INIT = 1, 2, 3, 14, 15, 17, 18, 25, 26
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
#: Requests the daemon never answers: the caller blocks in the kernel until ``close``.
STALLED = frozenset({READ})
_NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT, DESTROY})

ROOT_NODE, FILE_NODE = 1, 2
_FOPEN_KEEP_CACHE = 2
FILE_NAME = "artifact.pkl"
#: What the file claims to hold: a plausible artifact, so that nothing refuses it by size.
FILE_SIZE = 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_MNT_DETACH = 2


class StallingFs:
    """Mounted at ``mountpoint`` until ``close``; ``path`` is its one file."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.path = mountpoint / FILE_NAME
        self.stalled = 0  # requests left unanswered so far
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self._stop = threading.Event()
        opts = (f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
                "default_permissions").encode()
        if _libc.mount(b"airlock-stall", os.fsencode(mountpoint), b"fuse.airlockstall", 0,
                       opts) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"mount fuse at {mountpoint}: {os.strerror(err)}")
        self._thread = threading.Thread(target=self._serve, name="stalling-fuse", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Unmount and abort the connection: whatever is blocked on it fails now."""
        self._stop.set()
        _libc.umount2(os.fsencode(self.mountpoint), _MNT_DETACH)
        with contextlib.suppress(OSError):
            os.close(self._fd)  # the last reference to the connection: pending requests abort
        self._thread.join(5)

    def __enter__(self) -> StallingFs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], 0.2)
                if not ready:
                    continue
                request = os.read(self._fd, 1 << 20 | 4096)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted; EBADF: closed
            self._answer(request)

    def _answer(self, request: bytes) -> None:
        _len, opcode, unique, node, _uid, _gid, pid, *_ = _IN_HEADER.unpack_from(request)
        body = request[_IN_HEADER.size:]
        if opcode in _NO_REPLY:
            return
        if opcode in STALLED or (opcode == FLUSH and not _ours(pid)):
            self.stalled += 1
            return
        if opcode == INIT:
            _major, minor = struct.unpack_from("<II", body)
            # fuse_init_out (64 bytes): major, minor, max_readahead, flags, max_background,
            # congestion_threshold, max_write, time_gran, then zeros.
            out = struct.pack("<IIIIHHII", 7, min(minor, 31), 0, 0, 16, 12, 65536, 1)
            self._reply(unique, out.ljust(64, b"\0"))
        elif opcode == LOOKUP and node == ROOT_NODE and body.rstrip(b"\0") == FILE_NAME.encode():
            # fuse_entry_out: nodeid, generation, entry_valid, attr_valid, nsecs, attr.
            self._reply(unique, struct.pack("<QQQQII", FILE_NODE, 1, 3600, 3600, 0, 0)
                        + self._attr(FILE_NODE))
        elif opcode == GETATTR and node in (ROOT_NODE, FILE_NODE):
            self._reply(unique, struct.pack("<QII", 3600, 0, 0) + self._attr(node))
        elif opcode == OPEN and node == FILE_NODE:
            # fh, open_flags, backing_id. KEEP_CACHE: without it each open invalidates the
            # page cache and waits for the pages a stalled read holds locked.
            self._reply(unique, struct.pack("<QIi", 1, _FOPEN_KEEP_CACHE, 0))
        elif opcode == STATFS:
            # fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, spare
            self._reply(unique, struct.pack("<QQQQQIII", 1024, 0, 0, 2, 0, 4096, 255, 4096)
                        .ljust(80, b"\0"))
        elif opcode in (RELEASE, FLUSH):  # FLUSH: from this process (the test) only
            self._reply(unique, b"")
        elif opcode == LOOKUP:
            self._reply(unique, b"", -errno.ENOENT)
        else:
            self._reply(unique, b"", -errno.ENOSYS)

    @staticmethod
    def _attr(node: int) -> bytes:
        if node == ROOT_NODE:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o444, FILE_SIZE, 1
        # ino, size, blocks, atime, mtime, ctime, 3 nsecs, mode, nlink, uid, gid, rdev,
        # blksize, flags
        return _ATTR.pack(node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, nlink,
                          0, 0, 0, 4096, 0)

    def _reply(self, unique: int, payload: bytes, error: int = 0) -> None:
        with contextlib.suppress(OSError):  # the request was interrupted meanwhile
            os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), error, unique)
                     + payload)


def _ours(tid: int) -> bool:
    """Whether the thread that sent a request belongs to this process (FUSE names threads)."""
    return os.path.exists(f"/proc/self/task/{tid}")


@contextlib.contextmanager
def overlay_over(lower: Path, scratch: Path) -> Iterator[Path]:
    """A kernel overlay whose lower layer is ``lower``; yields its merged directory."""
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for path in (upper, work, merged):
        path.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", os.fsencode(merged), b"overlay", 0, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount overlay at {merged}: {os.strerror(err)}")
    try:
        yield merged
    finally:
        _libc.umount2(os.fsencode(merged), _MNT_DETACH)
