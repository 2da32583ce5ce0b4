"""What the artifact's bytes are (magic bytes, DESIGN §1.7; a zip's member names), checked
against what the broker decided (``JobSpec.artifact_format``). The broker decides once; the
sandbox re-checks, because only it may list a zip (DESIGN §1.1)."""

from __future__ import annotations

import os
import zipfile
from typing import IO

from airlock_sandbox.contract import WorkerExit
from airlock_sandbox.formats import (
    BOOSTER_FORMATS,
    DATA_FORMATS,
    LIGHTGBM_END_OF_TREES,
    PREFIX_BYTES,
    TAIL_BYTES,
    ArtifactFormat,
    booster_tail_problem,
    candidates,
    detect_prefix,
    refine_zip_names,
)

from . import zip_budget
from .errors import WorkerError

#: A zip's central directory is parsed into memory; a bomb of empty entries is refused from
#: its end records (zip_budget) before any parse, not by the container's memory limit.
MAX_ZIP_ENTRIES = zip_budget.DEFAULT_BUDGET.max_entries


def detect(path: str | IO[bytes]) -> ArtifactFormat:
    """The refined format of the file at ``path``, or of a seekable binary file from its
    start (``UNKNOWN`` if nothing matches). A booster file must end as one too."""
    if isinstance(path, str):
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            prefix = f.read(PREFIX_BYTES)
            fmt = detect_prefix(prefix, size)
            if fmt in BOOSTER_FORMATS:
                _check_booster(f, fmt, size)
    else:
        size = path.seek(0, os.SEEK_END)
        path.seek(0)
        prefix = path.read(PREFIX_BYTES)
        fmt = detect_prefix(prefix, size)
        if fmt in BOOSTER_FORMATS:
            _check_booster(path, fmt, size)
        path.seek(0)
    if fmt is ArtifactFormat.ZIP:
        fmt = _refine_zip(path)
    return fmt


def _check_booster(f: IO[bytes], fmt: ArtifactFormat, size: int) -> None:
    """Refuse a booster file that is not whole (formats.booster_tail_problem)."""
    f.seek(max(0, size - TAIL_BYTES))
    tail = f.read(TAIL_BYTES)
    ended, nul = True, False
    if fmt is ArtifactFormat.LIGHTGBM_TEXT:
        ended, nul = _scan_text(f)
    problem = booster_tail_problem(fmt, tail, ended, nul)
    if problem is not None:
        raise WorkerError(WorkerExit.UNSUPPORTED_FORMAT, problem)


def _scan_text(f: IO[bytes], chunk: int = 1 << 20) -> tuple[bool, bool]:
    """Whether the file, read from the start in bounded chunks, holds LightGBM's end-of-trees
    line, and whether it holds a NUL byte (stops at the first one)."""
    f.seek(0)
    marker = LIGHTGBM_END_OF_TREES
    carry = b""
    ended = False
    while block := f.read(chunk):
        if b"\x00" in block:
            return ended, True
        ended = ended or marker in carry + block
        carry = block[-(len(marker) - 1):]
    return ended, False


def _refine_zip(path: str | IO[bytes]) -> ArtifactFormat:
    try:
        zip_budget.check(path)
    except zip_budget.ZipOverBudget as exc:
        raise WorkerError(WorkerExit.UNSUPPORTED_FORMAT, str(exc)) from None
    except OSError as exc:
        raise WorkerError(WorkerExit.UNSUPPORTED_FORMAT, f"unreadable zip archive: {exc}") from None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise WorkerError(WorkerExit.UNSUPPORTED_FORMAT, f"unreadable zip archive: {exc}") from None
    if len(names) > MAX_ZIP_ENTRIES:
        raise WorkerError(
            WorkerExit.UNSUPPORTED_FORMAT,
            f"zip archive has {len(names)} entries (limit {MAX_ZIP_ENTRIES})",
        )
    return refine_zip_names(names)


def confirm(path: str, decided: ArtifactFormat | None, declared: str | None) -> ArtifactFormat:
    """The artifact's format once its bytes are seen to agree with the broker's decision (a
    zip listed to tell which zip it is); raise the matching :class:`WorkerError` if not.

    A zip is an MLflow bundle only when the broker decided so from the caller's declaration
    (the client declares the directories it packs): it chose the job's profile from that, so
    an undeclared bundle, or a declared one that is no readable bundle, is refused here."""
    if decided is None:
        raise WorkerError(WorkerExit.BAD_JOB_SPEC, "the job spec names no artifact format")
    if decided in DATA_FORMATS:  # no magic bytes: any format's are a contradiction
        with open(path, "rb") as f:
            found = detect_prefix(f.read(PREFIX_BYTES), os.fstat(f.fileno()).st_size)
        if found is not ArtifactFormat.UNKNOWN:
            raise WorkerError(WorkerExit.FORMAT_MISMATCH,
                              f"declared {decided.value}, but the bytes are {found.value}")
        return decided
    try:
        fmt = detect(path)
    except WorkerError as exc:
        if decided is ArtifactFormat.MLFLOW and exc.exit is WorkerExit.UNSUPPORTED_FORMAT:
            raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR,
                              f"the bundle is not a zip the sandbox will read: {exc.message}"
                              ) from None
        raise
    if fmt in (ArtifactFormat.UNKNOWN, ArtifactFormat.ZIP):
        raise WorkerError(WorkerExit.UNSUPPORTED_FORMAT, "unrecognised artifact format")
    if fmt is ArtifactFormat.MLFLOW and decided is not ArtifactFormat.MLFLOW:
        raise WorkerError(WorkerExit.FORMAT_MISMATCH,
                          "the zip holds an MLmodel at its root: an MLflow bundle must be "
                          "declared as mlflow (the client does this for model directories)")
    if fmt not in candidates(decided, declared):
        said = f"declared format {declared!r}, " if declared is not None else ""
        raise WorkerError(
            WorkerExit.FORMAT_MISMATCH,
            f"{said}the broker read {decided.value} from the leading bytes, but the bytes "
            f"are {fmt.value}",
        )
    return fmt
