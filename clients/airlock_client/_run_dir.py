"""A command's work directory, which the next command removes if this one was killed.

``airlock convert`` of a registry URI downloads the model, of a directory bundles it, and
``airlock migrate`` downloads every version: into temporary directories, removed when the
command ends. A command killed by SIGKILL (or the OOM killer) removes nothing, and those
directories, each perhaps holding a model of many GiB, stayed in ``$TMPDIR`` for ever.

So such a command keeps all of its temporary files in one directory (``tempfile`` puts them
there while the block runs), made and locked like a model directory's temporary output
(``_part_files.new_dir``: ``.airlock-run.XXXXXXXX.airlock-part``, mode 0700, an ``flock``
the kernel drops however the process ends), and the next command removes what killed ones
left by the same rules (``_part_files.sweep``: unlocked, unmodified for a minute, on a local
filesystem, no link followed). The library's own temporary directories (a directory's bundle,
a downloaded source or twin) are made the same way (``scratch_dir``), so that a serving job
killed by the OOM killer during a download leaves nothing behind either.

Everything in them is used by its name, so ``$TMPDIR`` must be a directory where no one else
can give an entry a name (``_part_files.names_are_ours``: sticky like ``/tmp``, or the user's
alone). In a team's ``2775`` any member could rename the work directory away and put a link
to a directory of theirs at its name: the downloads and bundles would be made there, for them
to read or replace before they are converted. Such a ``$TMPDIR`` is refused
(``UNSAFE_TMPDIR``).

Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from airlock_client import _part_files
from airlock_client._errors import AirlockError

#: The work directories are temporary outputs of this (never written) name in ``$TMPDIR``.
WORK_NAME = "airlock-run"


class UnsafeTempDir(AirlockError):
    """``$TMPDIR`` is a directory where others can give entries names (see the module)."""

    reason = "UNSAFE_TMPDIR"


def _checked_tempdir() -> Path:
    """``tempfile``'s directory, if no one else can name entries in it."""
    where = Path(tempfile.gettempdir())
    try:
        safe = _part_files.names_are_ours(os.stat(where))
    except OSError:
        return where  # making the directory there fails with what is wrong
    if not safe:
        raise UnsafeTempDir(
            f"the temporary directory {where} can be written by other users and has no "
            "sticky bit: any of them could redirect this process's downloads and bundles to "
            "a directory of theirs; set TMPDIR to a directory only you can write, or to one "
            "with the sticky bit (such as /tmp)")
    return where


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A temporary directory (mode 0700) in ``tempfile``'s, removed when the block ends, and
    by the next ``scratch_dir`` of the same ``name`` if this process is killed first. The
    library's downloads and bundles are made in these."""
    part = _part_files.new_dir(_checked_tempdir() / name)  # sweeps first
    try:
        yield part.path
    finally:
        part.remove()
        part.release()


@contextlib.contextmanager
def run_directory() -> Iterator[tuple[Path, list[str]]]:
    """Remove the work directories of killed commands, make this one's, and have
    ``tempfile`` put everything in it until the block ends; it is removed then. Yields the
    directory and the names of those removed."""
    removed = _part_files.sweep(_checked_tempdir() / WORK_NAME)
    with scratch_dir(WORK_NAME) as path:
        saved, tempfile.tempdir = tempfile.tempdir, str(path)
        try:
            yield path, removed
        finally:
            tempfile.tempdir = saved
