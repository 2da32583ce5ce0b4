"""A long command's private work directory, which a later run reclaims once its owner is dead.

``airlock migrate`` downloads each version into a temporary directory and removes it when the
version is done. A process killed by SIGKILL (or the OOM killer) removes nothing: its
directories, each perhaps holding a downloaded model of many GiB, stayed in ``/tmp`` for ever.

So a run keeps all of its temporary files in one directory of its own (``run_directory``:
``tempfile`` puts them there for the run) and holds an exclusive ``flock`` on a lock file in
it for as long as the process lives. The kernel releases that lock however the process ends.
The next run, before it makes its own, removes every such directory whose lock it can take:
its owner is gone. It looks only at directories of its own uid, mode 0700, and opens nothing
through a link; the directory is removed with ``shutil.rmtree``'s descriptor-based walk, which
does not follow links inside it either. A live run's directory is always locked under its
final name: it is locked under a staging name, then renamed.

Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: The lock file inside a run's directory.
LOCK_NAME = ".lock"
#: A run's directory is named ``PREFIX + RUN + random``; ``PREFIX + STAGING + random`` until
#: it is locked.
RUN = "run-"
STAGING = "new-"


@dataclass(frozen=True)
class Swept:
    """The directories of dead runs a sweep removed, and the bytes their files held."""

    directories: int = 0
    bytes: int = 0


def sweep(parent: Path, prefix: str) -> Swept:
    """Remove the run directories under ``parent`` whose owner process is gone."""
    removed = Swept()
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return removed
    try:
        with os.scandir(parent_fd) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix + RUN)]
        for name in names:
            size = _reclaim(parent_fd, name)
            if size is not None:
                removed = Swept(removed.directories + 1, removed.bytes + size)
    finally:
        os.close(parent_fd)
    return removed


@contextlib.contextmanager
def run_directory(prefix: str) -> Iterator[tuple[Path, Swept]]:
    """Sweep dead runs' directories from the temporary directory, then make and lock this
    run's, and have ``tempfile`` put everything there until the block ends (the directory is
    removed then). Yields the directory and what the sweep removed."""
    parent = Path(tempfile.gettempdir())
    swept = sweep(parent, prefix)
    staging = Path(tempfile.mkdtemp(prefix=prefix + STAGING, dir=parent))
    lock_fd = -1
    path = staging
    try:
        lock_fd = os.open(staging / LOCK_NAME,
                          os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = parent / (prefix + RUN + staging.name[len(prefix + STAGING):])
        os.rename(staging, path)  # a fresh random name: mkdtemp's, which nothing else holds
        saved, tempfile.tempdir = tempfile.tempdir, str(path)
        try:
            yield path, swept
        finally:
            tempfile.tempdir = saved
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if lock_fd >= 0:
            os.close(lock_fd)


def _reclaim(parent_fd: int, name: str) -> int | None:
    """Remove ``name`` (under ``parent_fd``) if it is a run directory of ours whose lock is
    free; its files' bytes, or None if it was left."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not _ours(st, stat.S_ISDIR, 0o700):
            return None
        dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)
    except OSError:
        return None
    try:
        if (os.fstat(dir_fd).st_ino, os.fstat(dir_fd).st_dev) != (st.st_ino, st.st_dev):
            return None
        try:
            lock_fd = os.open(LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dir_fd)
        except OSError:
            return None  # no lock file: not a run directory this module made
        try:
            if not _ours(os.fstat(lock_fd), stat.S_ISREG, 0o600):
                return None
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None  # its run is alive
                raise
            size = _size(dir_fd)
            shutil.rmtree(name, dir_fd=parent_fd, ignore_errors=True)
            return size
        finally:
            os.close(lock_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)


def _ours(st: os.stat_result, kind: Callable[[int], bool], mode: int) -> bool:
    return kind(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == mode


def _size(dir_fd: int) -> int:
    """The bytes of the regular files under ``dir_fd``, walked without following a link."""
    total = 0
    for _, _, files, fd in os.fwalk(".", dir_fd=dir_fd, follow_symlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total
