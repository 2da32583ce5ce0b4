"""Taking the output file (and the informational report) out of a dead sandbox's directory.

The out directory was writable by the container, so everything in it is attacker-shaped: names,
file types, link counts and sizes. We only ever ``lstat`` and open with ``O_NOFOLLOW``, and open
with ``O_NONBLOCK`` so that a FIFO planted under the expected name can never block the broker
(DESIGN §1.4). Nothing here follows a symlink, and nothing trusts a name it did not expect.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from airlock_broker.errors import Reason, error
from airlock_broker.validation.limits import OutputLimits
from airlock_sandbox.contract import MAX_REPORT_BYTES, REPORT_NAME
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def describe_name(name: str, limit: int = 64) -> str:
    """Render an attacker-chosen name for a message or log line: quoted, escaped, truncated."""
    shown = name if len(name) <= limit else name[:limit] + "..."
    return ascii(shown)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return kind
    return "special file"


def _problem_with(st: os.stat_result) -> str | None:
    """Why a stat result is not a plain single-link regular file, or None if it is."""
    if not stat.S_ISREG(st.st_mode):
        return f"is a {_file_kind(st.st_mode)}, not a regular file"
    # A second link means the container could have linked a file it should not own, or keeps
    # a name through which the content can change under us.
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links"
    return None


def open_regular_file(path: Path) -> tuple[BinaryIO, os.stat_result]:
    """Open ``path`` for reading only if it is a single-link regular file, never following links.

    The ``lstat`` before and the ``fstat`` after the open must name the same inode, so a swap
    between the two is caught. Raises ``OUTPUT_INVALID`` otherwise; the caller closes the file.
    ``O_NOFOLLOW`` guards the last component only: the directories above it must be the
    broker's own.
    """
    name = describe_name(path.name)
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise error(Reason.OUTPUT_INVALID, f"output {name} is missing") from None
    problem = _problem_with(before)
    if problem is not None:
        raise error(Reason.OUTPUT_INVALID, f"output {name} {problem}")
    # ELOOP: it became a symlink; ENOENT: it went away. A FIFO opens at once (O_NONBLOCK) and
    # is caught by the fstat check below.
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise error(
            Reason.OUTPUT_INVALID, f"output {name} cannot be opened: {exc.strerror}"
        ) from exc
    try:
        after = os.fstat(fd)
        problem = _problem_with(after)
        if problem is None and (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            problem = "was replaced while being opened"
        if problem is not None:
            raise error(Reason.OUTPUT_INVALID, f"output {name} {problem}")
        return os.fdopen(fd, "rb", buffering=0), after
    except BaseException:
        os.close(fd)
        raise


def read_upto(handle: BinaryIO, size: int) -> bytes:
    """Read until ``size`` bytes or end of file: a raw read may legally return less."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = handle.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def collect_output(out_dir: Path, expected_name: str, limits: OutputLimits) -> Path:
    """Check a dead sandbox's out dir and return the path of its one output file.

    The directory must hold ``expected_name`` and at most ``REPORT_NAME`` besides; the output
    must be a non-empty, single-link regular file of at most ``limits.max_output_bytes``.
    Raises ``OUTPUT_INVALID`` or ``OUTPUT_TOO_LARGE``; ``OSError`` if ``out_dir`` itself
    cannot be listed (it is the broker's own directory, so that is a bug, not a verdict). Call
    only once the container is dead: until then it can change anything checked here.
    """
    if expected_name in ("", ".", "..", REPORT_NAME) or "/" in expected_name:
        raise ValueError(f"not a valid output name: {expected_name!r}")
    allowed = {expected_name, REPORT_NAME}
    found = False
    with os.scandir(out_dir) as entries:
        # Stop at the first stranger: the directory may hold a million of them.
        for entry in entries:
            if entry.name not in allowed:
                raise error(
                    Reason.OUTPUT_INVALID,
                    f"unexpected entry {describe_name(entry.name)} beside the output",
                )
            found = found or entry.name == expected_name
    if not found:
        raise error(Reason.OUTPUT_INVALID, f"no output {describe_name(expected_name)} produced")

    path = out_dir / expected_name
    handle, st = open_regular_file(path)
    handle.close()
    if st.st_size == 0:
        raise error(Reason.OUTPUT_INVALID, "output is empty")
    if st.st_size > limits.max_output_bytes:
        raise error(
            Reason.OUTPUT_TOO_LARGE,
            f"output is {st.st_size} bytes, over the {limits.max_output_bytes}-byte cap",
        )
    return path


def read_report(out_dir: Path, max_bytes: int = MAX_REPORT_BYTES) -> dict[str, Any] | None:
    """Read the worker's ``REPORT_NAME`` if it is present and well-formed, else ``None``.

    The report is informational and untrusted: it must never fail a good conversion, so every
    problem is logged and yields ``None``. Callers must treat the values as attacker text.
    """
    path = out_dir / REPORT_NAME
    try:
        os.lstat(path)
    except FileNotFoundError:
        log.debug("no report in %s", out_dir)
        return None
    except OSError as exc:
        log.warning("ignoring report: %s", exc)
        return None
    try:
        handle, st = open_regular_file(path)
    except Exception as exc:  # AirlockError from the checks; OSError if out_dir itself is odd
        log.warning("ignoring report: %s", exc)
        return None
    with handle:
        if st.st_size > max_bytes:
            log.warning("ignoring report: %d bytes, over the %d-byte cap", st.st_size, max_bytes)
            return None
        raw = read_upto(handle, max_bytes + 1)
    if len(raw) > max_bytes:
        log.warning("ignoring report: grew past the %d-byte cap", max_bytes)
        return None
    try:
        doc = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, StrictJSONError) as exc:
        log.warning("ignoring report: not strict UTF-8 JSON (%s)", str(exc)[:200])
        return None
    if not isinstance(doc, dict):
        log.warning("ignoring report: top level is %s, not an object", type(doc).__name__)
        return None
    return doc
