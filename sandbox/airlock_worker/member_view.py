"""One STORED member of the read-only bundle, read in place: a bounded, seekable, read-only
file object over ``[start, start + size)`` of the artifact. Loaders get this instead of a
copy in the sandbox's tmpfs, so the largest model an MLflow bundle can carry is bounded by
the artifact limit, not by the scratch space.

Every read is a ``pread`` at an offset the view computes itself; nothing outside the window
is ever returned, and the view exposes no ``fileno`` (a raw descriptor would let a loader
read, or mmap, the whole artifact). The member's local header is checked against its central
directory entry and its CRC-32 is verified before the first loader read, as ``zipfile``
did when the member was copied.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import TYPE_CHECKING

from airlock_sandbox.contract import WorkerExit

from .errors import WorkerError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_LOCAL = struct.Struct("<4s5H3L2H")
_LOCAL_SIG = b"PK\x03\x04"
_CRC_CHUNK = 1024 * 1024
#: Loaders read small pieces (pickle opcodes); a buffer keeps that from becoming one
#: syscall per opcode.
BUFFER_BYTES = 1024 * 1024


class MemberView(io.RawIOBase):
    """A read-only window of ``length`` bytes at ``start`` of the file behind ``fd``.

    Owns ``fd`` (closed with the view). Seeking before 0 is refused; seeking past the end
    is allowed, as for a file, and reads there return nothing."""

    def __init__(self, fd: int, start: int, length: int, name: str) -> None:
        super().__init__()
        # Owned only once valid: a view refused here is still finalised (IOBase.__del__ calls
        # close), and must not close the descriptor number again when it may be someone else's.
        self._fd = -1
        try:
            size = os.fstat(fd).st_size
            if start < 0 or length < 0 or start + length > size:
                raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                                  f"{name[:80]!r} lies outside the bundle ({start}+{length} "
                                  f"of {size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._start = start
        self._length = length
        self._pos = 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a member view has no descriptor of its own")

    def __len__(self) -> int:
        return self._length

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.closed:
            raise ValueError("read from a closed member view")
        out = memoryview(buffer).cast("B")
        count = min(len(out), self._length - self._pos)
        if count <= 0:
            return 0
        data = os.pread(self._fd, count, self._start + self._pos)
        if len(data) != count:  # the read-only input cannot shrink; refuse rather than guess
            raise OSError(f"{self.name[:80]!r}: short read inside the bundle")
        out[:count] = data
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek on a closed member view")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        target = base + offset
        if target < 0:
            raise ValueError("seek before the start of the member")
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            fd, self._fd = self._fd, -1  # closed once, whoever calls (close, __del__)
            try:
                if fd >= 0:
                    os.close(fd)
            finally:
                super().close()


def data_offset(fd: int, info: zipfile.ZipInfo, archive_size: int) -> int:
    """Where a STORED member's bytes start, from its local header, which must agree with
    the central directory (name, method, no encryption) and leave the data inside the file."""
    at = info.header_offset
    name = info.filename[:80]
    if at < 0 or at + _LOCAL.size > archive_size:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, f"member {name!r} lies outside the bundle")
    fields = _LOCAL.unpack(os.pread(fd, _LOCAL.size, at))
    sig: bytes = fields[0]
    flags: int = fields[2]
    method: int = fields[3]
    name_len: int = fields[9]
    extra_len: int = fields[10]
    if sig != _LOCAL_SIG:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, f"member {name!r} has no local header")
    if flags & 0x1 or method != zipfile.ZIP_STORED:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"member {name!r} is encrypted or compressed in its local header")
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if os.pread(fd, name_len, at + _LOCAL.size) != info.orig_filename.encode(encoding):
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"member {name!r}: local and central names differ")
    start = at + _LOCAL.size + name_len + extra_len
    if start + info.file_size > archive_size:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"member {name!r} runs past the end of the bundle")
    return start


def open_member(path: str, info: zipfile.ZipInfo) -> io.BufferedReader:
    """A buffered, bounded view of one already-checked STORED member of the bundle at
    ``path``, its CRC verified. The caller closes it."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"member {info.filename[:80]!r} is not stored")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        start = data_offset(fd, info, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise
    view = MemberView(fd, start, info.file_size, info.filename)
    try:
        _check_crc(view, info)
        view.seek(0)
        return io.BufferedReader(view, BUFFER_BYTES)
    except BaseException:
        view.close()
        raise


def _check_crc(view: MemberView, info: zipfile.ZipInfo) -> None:
    crc = 0
    chunk = bytearray(_CRC_CHUNK)
    while count := view.readinto(chunk):
        crc = zlib.crc32(memoryview(chunk)[:count], crc)
    if crc != info.CRC:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                          f"member {info.filename[:80]!r} fails its CRC-32 check")
