"""What another user can leave in a directory others may write (`/tmp`, a team's), under our
names or the names we are given."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: A uid no one on this machine has: the owner of another user's files (the suite runs as
#: root, which can give a file to anyone).
STRANGER = 4242


def nest(path: Path, depth: int) -> None:
    """``depth`` directories nested in ``path``, made one level at a time (a path that long
    could not be named)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def plant(directory: Path, depth: int = 1500) -> None:
    """``directory``, made as another user would: open to all, ``depth`` levels deep (too
    deep for Python 3.11's recursive ``rmtree``), that user's, last modified an hour ago."""
    directory.mkdir()
    directory.chmod(0o777)
    nest(directory, depth)
    os.chown(directory, STRANGER, STRANGER)
    os.utime(directory, (os.path.getmtime(directory) - 3600,) * 2)


def remove(path: Path) -> None:
    """Remove a tree made by ``nest`` or ``plant``, which Python 3.11's ``rmtree`` (and so
    pytest's clean-up of old temporary directories) cannot: ``rm`` walks it iteratively."""
    subprocess.run(["rm", "-rf", "--", str(path)], check=True, timeout=120)


def swap(parent: Path, pattern: str, target: Path) -> Path:
    """What another user who may write ``parent`` (a team's directory, not sticky) does while
    a conversion runs: renames the temporary output whose name matches ``pattern`` away and
    links its name to ``target``, one of the user's own files. Where it was moved to."""
    [name] = [p for p in parent.iterdir() if re.fullmatch(pattern, p.name)]
    moved = parent / "moved-away"
    os.rename(name, moved)
    os.symlink(target, name)
    return moved


def private_file(path: Path, data: bytes = b"aws_secret_access_key = SECRET\n") -> Path:
    """A file of the user's that no one else may read (``path`` in a 0700 directory)."""
    path.parent.mkdir(mode=0o700)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def finishes_within(call: Callable[[], Any], seconds: float, *,
                    unblock: Callable[[], None] | None = None,
                    still: str = "the call still ran") -> Any:
    """What ``call`` returned, or the exception it raised. Fails the test, saying ``still``,
    if it has not finished after ``seconds`` (``unblock`` is then called so that the waiting
    thread ends)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
            thread.join(seconds)
        pytest.fail(f"{still} after {seconds:.0f} s")
    return outcome[0]


def returns_within(call: Callable[[], Any], fifo: Path, seconds: float = 60.0) -> Any:
    """``finishes_within`` for a call that may wait at the FIFO ``fifo``: a writer then opens
    it, so that the waiting thread ends."""
    def unblock() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    return finishes_within(call, seconds, unblock=unblock,
                           still=f"still waiting at the FIFO {fifo}")
