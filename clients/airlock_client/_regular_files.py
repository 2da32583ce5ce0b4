"""Files a user names, read so that what someone else put at the name cannot stall or flood a
command: a FIFO is never waited on and a device or a directory never read (an ``OSError``
whose ``strerror`` is ``NOT_REGULAR``), and a small file is read up to its cap and no further
(``read_small``).

A path in a directory others may write (a shared key, a team's model) can be swapped for a
FIFO between any check and the open: a plain ``open`` then waits for a writer for ever. So
the open itself is the check: non-blocking, then ``fstat`` of what was opened.

Imports nothing heavy: ``airlock convert`` uses it.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

#: The ``strerror`` of the ``OSError`` for what is not a regular file.
NOT_REGULAR = "not a regular file (a FIFO, a device or a directory is never read)"


def open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None,
                 follow: bool = True) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; ``OSError`` (``NOT_REGULAR``)
    otherwise, without waiting on a FIFO. ``follow=False``: not through a link either."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole of the regular file ``path``, which must hold at most ``limit`` bytes
    (``OSError`` EFBIG otherwise: at most ``limit`` + 1 bytes are read to tell)."""
    with open_regular(path) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return data
