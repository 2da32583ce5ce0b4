"""Where an output is written before it is renamed into place, and what a killed run left.

An output (one converted file, a model directory) is written as ``.NAME.XXXXXXXX.part``
(a directory: ``.airlock-part``) beside its destination and renamed at the end, so that a
reader never sees half of it. A run that ends in any ordinary way removes it. A run that is
killed (SIGKILL, a third Ctrl-C, power loss) cannot: the next conversion to the same
destination removes what such runs left, and only that:

- each temporary output is locked (``flock``) by the process writing it for as long as it
  exists; the kernel drops the lock when that process dies, however it dies;
- a leftover is a name of exactly that form, for that destination, a regular file or a
  directory (never a link: nothing is followed), whose lock can be taken and which has not
  been modified for ``STALE_SECONDS`` (a run between creating its file and locking it is
  never mistaken for a dead one).

Imports nothing heavy: ``airlock convert`` uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FILE_SUFFIX = ".part"
DIR_SUFFIX = ".airlock-part"
#: How long a temporary output must have been left unmodified before it may be a leftover.
STALE_SECONDS = 60.0
#: What ``tempfile`` puts between the prefix and the suffix.
_RANDOM = r"[a-z0-9_]{8}"


@dataclass
class PartFile:
    """A locked temporary file for ``output``: ``fd`` to write (the caller's to close,
    e.g. by ``os.fdopen``), ``path`` to rename; ``release()`` (in a ``finally``, after the
    rename or the removal) drops the lock."""

    fd: int
    path: Path
    _lock: int

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def new_file(output: Path) -> PartFile:
    """A new ``.NAME.XXXXXXXX.part`` beside ``output`` (mode 0600), locked by this process
    until ``release``. The lock is held through a descriptor of its own, so that closing
    ``fd`` before the rename does not let another run take the file for a leftover."""
    sweep(output)
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=FILE_SUFFIX,
                                dir=output.parent)
    try:
        lock = os.dup(fd)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one description, one lock
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return PartFile(fd, Path(name), lock)


@dataclass
class PartDir:
    """A locked temporary directory for ``output``; ``release()`` drops the lock."""

    path: Path
    _lock: int

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def new_dir(output: Path) -> PartDir:
    """A new ``.NAME.XXXXXXXX.airlock-part`` directory beside ``output`` (mode 0700), locked
    by this process until ``release``."""
    sweep(output)
    path = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=DIR_SUFFIX,
                                 dir=output.parent))
    try:
        lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return PartDir(path, lock)


def sweep(output: Path, *, now: float | None = None) -> list[str]:
    """Remove the temporary outputs for ``output`` that killed runs left (see the module's
    docstring); the names removed. Errors are not raised: a leftover that cannot be removed
    is left as it is."""
    pattern = re.compile(re.escape(f".{output.name}.") + _RANDOM
                         + f"({re.escape(FILE_SUFFIX)}|{re.escape(DIR_SUFFIX)})")
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        names = os.listdir(output.parent)
    except OSError:
        return removed
    for name in names:
        if pattern.fullmatch(name) and _remove_if_left(output.parent, name, now):
            removed.append(name)
    return removed


def _remove_if_left(parent: Path, name: str, now: float) -> bool:
    path = parent / name
    try:
        st = os.lstat(path)
        if now - st.st_mtime < STALE_SECONDS:
            return False
        if stat.S_ISDIR(st.st_mode):
            flags = os.O_RDONLY | os.O_DIRECTORY
        elif stat.S_ISREG(st.st_mode):
            flags = os.O_RDONLY
        else:
            return False  # a link or a special file: not ours, never followed
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (st.st_ino, st.st_dev):
            return False  # replaced between the look and the open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its run is alive
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)  # fd-based on Linux: it follows no link inside
            else:
                os.unlink(path)
            return True
        return False
    finally:
        os.close(fd)
