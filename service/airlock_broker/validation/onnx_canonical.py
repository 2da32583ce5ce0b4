"""A validated ONNX model's canonical bytes, kept in a file only the broker holds.

A validator sends back the canonical bytes of the model it passed, up to ``[output]
max_onnx_bytes`` (512 MiB). Held in the broker's memory until the answer was written, two large
ONNX jobs at once added about 1 GiB to its RSS (the tenth review's known gap). Instead the
broker writes them, a block at a time as they come off the validator's socket
(``onnx_messages.read_message_into``), into an unnamed file (``O_TMPFILE``) on the spool's
disk, and hashes each block as it writes it: it never holds more than one block.

Why the bytes served are the bytes hashed: the file is made by the broker in a directory of
its own (the spool's ``results``, 0700), opened through that directory's descriptor without
following a link, and has no name (or, where the filesystem cannot make one without, loses it
before a byte is written): its one descriptor is the broker's, never passed to a validator or
a sandbox. Nothing else can open it, so nothing else can write it, before or after the hash.

Its disk is the job's to claim, with its answer's, before any sandbox starts
(``spool_space.canonical_bytes``, pipeline.py): a job whose canonical copy would take the
spool below its reserve is refused then (``SPOOL_FULL``), not after a conversion. The writer
draws on that claim (``Room``) as the bytes arrive: refused as ``SPOOL_FULL`` before a byte
is written only if the real size outgrew the estimate and the rest does not fit. The claim is
the job's to give back (its ``finally``), the file its job's to close (jobs.py); both go
when the broker dies.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from airlock_broker.errors import AirlockError, Reason, error

#: Where a filesystem without ``O_TMPFILE`` (or a kernel) says so.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})


class Room(Protocol):
    """A job's disk claimed on the spool for what it is about to write
    (``spool_space.SpoolClaim``): its owner releases it, not the writer."""

    def more(self, count: int) -> None: ...

    def wrote(self, count: int) -> None: ...

    def release(self) -> None: ...


class CanonicalOnnx:
    """One model's canonical bytes in a file of the broker's alone: ``size`` bytes, ``sha256``
    theirs. ``close`` once (its owner's ``finally``); ``dup`` for a holder that outlives it."""

    def __init__(self, fd: int, size: int, sha256: str) -> None:
        self._fd = fd
        self.size = size
        self.sha256 = sha256
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The descriptor, for explicit-offset reads (``file_copy.copy_file``); ``ValueError``
        once closed, never a number that may name another file since."""
        with self._lock:
            if self._fd < 0:
                raise ValueError("the canonical ONNX file is closed")
            return self._fd

    def dup(self) -> CanonicalOnnx:
        """The same file, held by a descriptor of its own (closed on its own)."""
        return CanonicalOnnx(os.dup(self.fileno()), self.size, self.sha256)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> CanonicalOnnx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CanonicalWriter:
    """Writes one message's bytes, as they come, into a new canonical file and its hash.

    ``begin(size)`` (``read_message_into``) draws its size on ``room`` (its job's claim;
    None: not accounted) and opens the file; the writer then takes each block; ``finish``
    hands over the file (``CanonicalOnnx``), ``close`` frees it unless it was handed over
    (its owner's ``finally``)."""

    def __init__(self, directory: Path, room: Room | None = None) -> None:
        self._directory = directory
        self._fd = -1
        self._room = room
        self._digest = hashlib.sha256()
        self._written = 0
        self.size = -1

    def begin(self, size: int) -> Callable[[memoryview], None]:
        if self._room is not None:
            self._room.more(size)
        try:
            self._fd = _unnamed_file(self._directory)
        except OSError as exc:
            raise _spool_failed(exc) from exc
        self.size = size
        return self._write

    def _write(self, block: memoryview) -> None:
        self._digest.update(block)
        offset, view = self._written, block
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise _spool_failed(exc) from exc
        self._written = offset
        if self._room is not None:
            self._room.wrote(len(block))

    def finish(self) -> CanonicalOnnx:
        """The file, whole: it is then the caller's to close."""
        if self._fd < 0 or self._written != self.size:
            raise ValueError("the canonical ONNX file is not whole")
        fd, self._fd = self._fd, -1
        return CanonicalOnnx(fd, self._written, self._digest.hexdigest())

    def close(self) -> None:
        """Frees the file, unless ``finish`` handed it over."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _spool_failed(exc: OSError) -> AirlockError:
    """The broker's own file failed (its disk, not the model): ``SPOOL_FULL`` for a full disk
    or quota, else ``INTERNAL``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return error(Reason.SPOOL_FULL, f"no room on the spool for an ONNX output's canonical "
                                        f"bytes: {exc.strerror}")
    return error(Reason.INTERNAL, f"cannot write an ONNX output's canonical bytes: {exc}")


def _unnamed_file(directory: Path) -> int:
    """A new, empty 0600 file in ``directory`` with no name, open for reading and writing;
    the directory is opened without following a link."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise
        # A filesystem without O_TMPFILE: a fresh name, never an existing entry or a link,
        # removed before a byte is written.
        name = f".onnx-canonical.{secrets.token_hex(8)}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(dir_fd)


__all__ = ["CanonicalOnnx", "CanonicalWriter", "Room"]
