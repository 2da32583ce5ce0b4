"""The files that say who may call the broker: no one else may have written them.

The configuration file (``--config``), ``[auth] tokens_file`` and the TLS files (``tls_cert``,
``tls_key``, ``client_ca``) decide who is a caller and with which roles. Whoever can write
one of them, or rename the directory holding it, is an administrator at the broker's next
start: one more ``[[auth.tokens]]`` table with the ``admin`` role, or a CA of their own that
signs any certificate subject. A review put a tokens file in a world-writable directory and
did exactly that, as ``nobody``. So each such file must be, at start:

- a regular file (a link is followed, as configuration management and Kubernetes secrets
  make them, and the file it leads to is what is checked);
- root's or the broker's own, and not writable by group or others;
- below directories that are root's or the broker's and not writable by others unless sticky
  (``state_dirs.check_ancestors``), as written and as resolved.

The file is opened once and judged by that descriptor (``fstat``, and the directories above
the file it really is, ``/proc/self/fd/N``), and what is read is read from it: a link
through a directory someone else may write could be re-pointed between a check by name and
an open, to a file of theirs (found in the review of the first version).

Anything else stops the broker with the file, the owner or mode found and what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from airlock_broker.security.state_dirs import StateDirError, check_ancestors

#: More than any configuration, tokens file, certificate or CA bundle holds.
MAX_BYTES = 4 * 1024 * 1024


def read_trusted_file(path: Path, what: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of ``path`` (``what`` names it: "[auth] tokens_file"), read through one
    descriptor that is checked first (see the module); ``ValueError`` if it fails a check or
    holds more than ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    try:
        _check(fd, path, what)
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} is larger than {max_bytes} bytes")
    return data


def check_trusted_file(path: Path, what: str) -> None:
    """``read_trusted_file``'s checks alone, for a file another library opens by name (the
    TLS files are read through ``read_trusted_file`` when used)."""
    read_trusted_file(path, what)


def _check(fd: int, path: Path, what: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    shown = f"{path} (-> {real})" if real != Path(os.path.abspath(path)) else str(path)
    if st.st_uid not in (0, os.geteuid()):
        raise ValueError(
            f"{what} {shown} is owned by uid {st.st_uid}: whoever may write it decides who may "
            f"call the broker and with which roles; chown it to root (or to uid "
            f"{os.geteuid()}, this process's)")
    if st.st_mode & 0o022:
        raise ValueError(
            f"{what} {shown} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "whoever may write it decides who may call the broker and with which roles; "
            "chmod go-w it")
    try:
        check_ancestors(real, what=what, elsewhere="keep the file in a directory only root "
                                                    "(or this process's user) can write")
    except StateDirError as exc:
        raise ValueError(f"{exc.path}: {exc.detail}; {exc.todo}") from None


__all__ = ["MAX_BYTES", "check_trusted_file", "read_trusted_file"]
