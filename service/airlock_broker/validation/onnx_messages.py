"""A validator's messages, read against a deadline that covers their every byte.

A validator writes with ``multiprocessing.connection.Connection.send_bytes``: a big-endian
int32 length, then that many bytes (a length of -1 announces a uint64 one: 2 GiB or more, more
than any cap here admits). ``Connection.recv_bytes`` has no deadline: once the length has come
it blocks until the last byte does. A subverted validator that sends a length and then sleeps
uses no CPU (RLIMIT_CPU never fires), and would hold the broker's thread, and its pool's slot,
for ever. So the broker reads the same framing here, and waits (``poll``) before every read no
longer than what is left of the deadline.
"""

from __future__ import annotations

import io
import math
import os
import select
import struct
import time
from collections.abc import Callable

#: What ``Connection.send_bytes`` writes before a message shorter than 2 GiB.
LENGTH = struct.Struct("!i")
#: Bytes asked of the socket at once, and all the broker holds of a message it does not keep
#: (``read_message_into``).
BLOCK_BYTES = 1 << 20


class Late(Exception):
    """The deadline passed before the whole message came; says how much of it had."""

    def __init__(self, got: int, size: int | None) -> None:
        self.got = got
        #: The length the message announced; None if not even that had come.
        self.size = size
        super().__init__("no message had begun" if size is None else
                         f"{got} of a {size}-byte message had come")


class BadLength(Exception):
    """The message announced more bytes than the reader's limit, or a negative number of
    them (none of its bytes was read)."""


def read_message(fd: int, deadline: float, limit: int) -> bytes | None:
    """The next message on the stream socket ``fd``; None if the writer closed it (or died)
    before the message's last byte. ``Late`` once ``deadline`` (``time.monotonic``) passes,
    ``BadLength`` if it announces more than ``limit`` bytes. Polls: ``fd`` may be blocking."""
    buffer = io.BytesIO()  # its getvalue() hands over its bytes without copying them
    size = read_message_into(fd, deadline, limit, lambda _size: buffer.write)
    return None if size is None else buffer.getvalue()


def read_message_into(fd: int, deadline: float, limit: int,
                      begin: Callable[[int], Callable[[memoryview], object]]) -> int | None:
    """``read_message`` without holding the message: once its length has come (and passed
    ``limit``), ``begin(length)`` returns where its bytes go, and they go there as they
    come, at most ``BLOCK_BYTES`` at a time, out of one buffer reused for every block (a
    block handed over is valid only during that call). The message's length, or None as
    ``read_message`` says."""
    header = bytearray(LENGTH.size)
    if _read_exactly(fd, LENGTH.size, deadline, None, memoryview(header), None) is None:
        return None
    (size,) = LENGTH.unpack(header)
    if size == -1 or size > limit:
        announced = "2 GiB or more" if size == -1 else f"{size} bytes"
        raise BadLength(f"it announced a message of {announced}, over the {limit}-byte limit")
    if size < 0:
        raise BadLength(f"it announced a message of {size} bytes")
    sink = begin(size)
    block = memoryview(bytearray(min(size, BLOCK_BYTES)))
    return _read_exactly(fd, size, deadline, size, block, sink)


def _read_exactly(fd: int, size: int, deadline: float, announced: int | None,
                  buffer: memoryview, sink: Callable[[memoryview], object] | None) -> int | None:
    """``size`` bytes; their count, or None at end of file. ``sink`` None: they fill
    ``buffer`` (``size`` long); else each run of them is read into the start of ``buffer``
    and handed to ``sink``. ``announced``: the message's length, for ``Late`` (None while
    its length is read)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Late(got, announced)
        if not poller.poll(math.ceil(remaining * 1000)):
            continue  # timed out: the check above says so
        into = buffer[got:size] if sink is None else buffer[:min(size - got, len(buffer))]
        try:
            n = os.readv(fd, [into])
        except ConnectionResetError:
            return None
        if not n:
            return None
        if sink is not None:
            sink(into[:n])
        got += n
    return got
