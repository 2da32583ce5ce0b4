"""Writing a whole file through a descriptor by explicit offsets, in the kernel where it can.

A descriptor may be shared with someone else (a same-host caller's output file, fastpath/), who
could move its offset at any time, so every access names its offset (``pwrite``,
``copy_file_range``). One exception: across filesystems (the output's tmpfs to the client's
disk) ``copy_file_range`` refuses and ``sendfile``, about twice as fast as read/write there,
writes at the destination's file offset, set just before. Only the descriptor's other holder
can move that offset, so it could only misplace bytes in its own file, which then fails its
own checks.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

from airlock_broker.errors import Reason, error
from airlock_broker.security.caller_disk import as_broker
from airlock_broker.validation.files import open_regular_file
from airlock_broker.validation.safetensors_canonical import FileIdentity, SafetensorsInfo

#: Large blocks: a 400 MB file in 100 system calls.
BLOCK_BYTES = 4 * 1024 * 1024
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                            errno.EBADF, errno.ETXTBSY})


def write_canonical_safetensors(path: Path, info: SafetensorsInfo, dst: int) -> None:
    """The canonical file (validated header, then the data section) into ``dst``.

    The source must still be the file validation described (a dead sandbox's tmpfs, the
    broker's own), as for streaming; the data section is copied in the kernel when it can be.
    """
    with open_validated(path, info) as handle:
        write_canonical_from(handle, info, dst)


def open_validated(path: Path, info: SafetensorsInfo) -> BinaryIO:
    """``path`` opened for reading, if it is still the file validation described: an open
    file stays readable after its mount is lazily unmounted (a destroyed slot's)."""
    return open_identical(path, info.source)


def open_identical(path: Path, identity: FileIdentity) -> BinaryIO:
    """``path`` opened for reading, if it is still the file ``identity`` describes (as the
    broker, also on a thread that writes as a caller: caller_disk.py)."""
    with as_broker():
        handle, st = open_regular_file(path)
    if FileIdentity.of(st) != identity:
        handle.close()
        raise error(Reason.OUTPUT_INVALID, "output changed after it was validated")
    return handle


def copy_identical(path: Path, identity: FileIdentity, dst: int) -> None:
    """The file ``identity`` describes, whole, into ``dst`` (``copy_file``)."""
    with open_identical(path, identity) as handle:
        copy_file(handle.fileno(), dst, identity.size)


def write_canonical_from(handle: BinaryIO, info: SafetensorsInfo, dst: int) -> None:
    """``write_canonical_safetensors`` from the file ``open_validated`` returned."""
    header = info.canonical_header
    _write_all(dst, header, 0)
    copy_range(handle.fileno(), info.source_data_offset, dst, len(header), info.data_bytes)
    os.ftruncate(dst, info.canonical_size)


def copy_file(src: int, dst: int, size: int) -> None:
    """``size`` bytes of ``src`` (a broker file) as the whole of the file behind ``dst``."""
    copy_range(src, 0, dst, 0, size)
    os.ftruncate(dst, size)


def copy_range(src: int, src_off: int, dst: int, dst_off: int, count: int) -> None:
    """``copy_file_range``; across filesystems (tmpfs to disk) ``sendfile``; else read/write."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, src_off + done, dst_off + done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in _NO_COPY_RANGE:
            raise
    try:
        if done < count:
            os.lseek(dst, dst_off + done, os.SEEK_SET)
        while done < count:
            n = os.sendfile(dst, src, src_off + done, count - done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in _NO_COPY_RANGE:
            raise
    buf = memoryview(bytearray(min(BLOCK_BYTES, max(count - done, 1))))
    while done < count:
        n = os.preadv(src, [buf[:count - done]], src_off + done)
        if n == 0:
            break
        _write_all(dst, buf[:n], dst_off + done)
        done += n
    if done != count:
        raise error(Reason.OUTPUT_INVALID, "the output ended early while it was copied")


def write_at(data: bytes, offset: int, dst: int) -> None:
    """``data`` at ``offset`` of ``dst``, whatever the file's size (explicit offset: a peer
    sharing the descriptor may move its own)."""
    _write_all(dst, data, offset)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
