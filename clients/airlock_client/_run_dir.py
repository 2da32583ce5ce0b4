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
filesystem, no link followed).

Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from airlock_client import _part_files

#: The work directories are temporary outputs of this (never written) name in ``$TMPDIR``.
WORK_NAME = "airlock-run"


@contextlib.contextmanager
def run_directory() -> Iterator[tuple[Path, list[str]]]:
    """Remove the work directories of killed commands, make this one's, and have
    ``tempfile`` put everything in it until the block ends; it is removed then. Yields the
    directory and the names of those removed."""
    stand_in = Path(tempfile.gettempdir()) / WORK_NAME
    removed = _part_files.sweep(stand_in)
    part = _part_files.new_dir(stand_in)
    try:
        saved, tempfile.tempdir = tempfile.tempdir, str(part.path)
        try:
            yield part.path, removed
        finally:
            tempfile.tempdir = saved
    finally:
        shutil.rmtree(part.path, ignore_errors=True)
        part.release()
