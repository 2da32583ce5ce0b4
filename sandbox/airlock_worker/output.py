"""The one output file: written under a temporary name in OUT_DIR, size-checked, then renamed,
so the broker never sees a partial file and a failed job leaves nothing behind; or, where the
broker made it append-only for the job (JobSpec.output_in_place), written in place, which the
broker follows as it grows and judges only after this process is gone."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from airlock_sandbox.contract import (
    DONE_NAME,
    OUTPUT_NAMES,
    READY_NAME,
    REPORT_NAME,
    OutputFormat,
    WorkerExit,
)

from .errors import WorkerError

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def check_size(size: int, limit: int, what: str = "output") -> None:
    if size > limit:
        raise WorkerError(
            WorkerExit.OUTPUT_TOO_LARGE, f"{what} would be {size} bytes (limit {limit})"
        )


@contextlib.contextmanager
def staged(out_dir: str, fmt: OutputFormat, max_bytes: int) -> Iterator[str]:
    """Yield a temporary path in ``out_dir``; on clean exit, cap-check it and rename it to
    ``OUTPUT_NAMES[fmt]``. Any exception removes it. A full tmpfs counts as too large."""
    final = os.path.join(out_dir, OUTPUT_NAMES[fmt])
    tmp = os.path.join(out_dir, f".{OUTPUT_NAMES[fmt]}.partial")
    try:
        yield tmp
        check_size(os.stat(tmp).st_size, max_bytes)
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in _NO_SPACE:
            raise WorkerError(WorkerExit.OUTPUT_TOO_LARGE, f"output does not fit: {exc}") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def in_place(out_dir: str, fmt: OutputFormat, max_bytes: int) -> Iterator[str]:
    """Yield the path of the broker's empty, append-only ``OUTPUT_NAMES[fmt]``, to be opened
    for appending only (``"ab"``); on clean exit, cap-check it. Nothing can be removed from
    it: after a failure the broker disregards it, as it disregards any failed job's files."""
    final = os.path.join(out_dir, OUTPUT_NAMES[fmt])
    try:
        st = os.stat(final, follow_symlinks=False)
    except FileNotFoundError:
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          "the output to write in place does not exist") from None
    if st.st_size:
        raise WorkerError(WorkerExit.CONVERSION_FAILED, "the output to write in place is not empty")
    try:
        yield final
        check_size(os.stat(final).st_size, max_bytes)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise WorkerError(WorkerExit.OUTPUT_TOO_LARGE, f"output does not fit: {exc}") from None
        raise


def write_bytes(out_dir: str, fmt: OutputFormat, data: bytes, max_bytes: int) -> None:
    check_size(len(data), max_bytes)
    with staged(out_dir, fmt, max_bytes) as tmp, open(tmp, "xb") as f:
        f.write(data)


def write_report(out_dir: str, data: bytes) -> None:
    """Best effort: the report is informational and must never turn a result into a crash."""
    tmp = os.path.join(out_dir, f".{REPORT_NAME}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, REPORT_NAME))
    except OSError:
        _remove(tmp)


def mark_done(out_dir: str) -> None:
    """Say (by a rename, which the broker watches for) that this worker succeeded and waits."""
    _mark(out_dir, DONE_NAME)


def mark_ready(out_dir: str) -> None:
    """Say that this worker has warmed up and waits for its job spec (pool status reads it)."""
    _mark(out_dir, READY_NAME)


def _mark(out_dir: str, name: str) -> None:
    """An empty file ``name`` in ``out_dir``, appearing whole (by a rename); best effort."""
    tmp = os.path.join(out_dir, f".{name}.partial")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(tmp, os.path.join(out_dir, name))
    except OSError:
        _remove(tmp)


def remove_outputs(out_dir: str) -> None:
    """After a failure, make sure no output file (finished or partial) is left, except one
    the broker made append-only (``in_place``), which no one here may remove."""
    for name in OUTPUT_NAMES.values():
        with contextlib.suppress(PermissionError):
            _remove(os.path.join(out_dir, name))
        _remove(os.path.join(out_dir, f".{name}.partial"))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
