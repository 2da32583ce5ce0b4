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

Anything else stops the broker with the file, the owner or mode found and what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from airlock_broker.security.state_dirs import StateDirError, check_ancestors


def check_trusted_file(path: Path, what: str) -> None:
    """Raise ``ValueError`` unless ``path`` (``what`` names it: "[auth] tokens_file") is a
    file that only root or the broker's user could have written (see the module)."""
    resolved = Path(os.path.realpath(path))
    try:
        st = os.stat(resolved)
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    shown = path if resolved == path else f"{path} (-> {resolved})"
    if st.st_uid not in (0, os.geteuid()):
        raise ValueError(
            f"{what} {shown} is owned by uid {st.st_uid}: whoever may write it decides who may "
            f"call the broker and with which roles; chown it to root (or to uid "
            f"{os.geteuid()}, the broker's)")
    if st.st_mode & 0o022:
        raise ValueError(
            f"{what} {shown} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "whoever may write it decides who may call the broker and with which roles; "
            "chmod go-w it")
    elsewhere = "keep the file in a directory only root (or the broker's user) can write"
    try:
        check_ancestors(resolved, what=what, elsewhere=elsewhere)
        if resolved != path.absolute():
            check_ancestors(path.absolute(), what=what, elsewhere=elsewhere)
    except StateDirError as exc:
        raise ValueError(f"{exc.path}: {exc.detail}; {exc.todo}") from None


__all__ = ["check_trusted_file"]
