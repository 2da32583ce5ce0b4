"""The broker's state root: made safely, checked at start-up, refused loudly (DESIGN §1.8).

Everything the broker keeps lives under one directory that only its user may enter::

    <state root>/                   0700, the broker's user; /var/lib/airlock as root,
                                    $XDG_STATE_HOME/airlock otherwise (--state-dir,
                                    AIRLOCK_STATE_DIR or [broker] state_root move it)
        .lock                       one broker per state root (server.lock_state)
        audit.jsonl                 0600, the audit log (audit.py)
        provenance-signing-key.pem  0600, the signing key (keys.py)
        uploads/ results/ slots/    0700, the spool (workspace.py)
        ram/                        0700, the RAM spool: a tmpfs the broker mounts, with its
                                    own uploads/ and slots/ ([spool] ram_bytes; workspace.py)
        sockets/                    0755, the fast path's socket when there is no Unix socket

Why: a state directory in a place others can write (the old default was ``$TMPDIR``) can be
created by anyone before the broker starts, with an ``audit.jsonl`` that links to
``/etc/ld.so.preload`` or a ``slots/x`` that links to ``/home``. So every directory is made
with its mode and then checked with ``lstat``: a real directory (not a link), owned by the
broker's effective uid, with no group or other bits (the sockets' directory: no group or other
*write* bit, clients must reach it). Its ancestors must be root's or the broker's and not
writable by others (a sticky ``/tmp`` is fine: nobody can rename what is not theirs). Files
in it are opened ``O_NOFOLLOW`` and checked with ``fstat`` (``open_private_file``). What fails
a check stops the broker: ``StateDirError`` names the path, a reason code, and what to do.

Directories outside the root that the configuration names (an audit log or a key elsewhere,
the Unix socket's ``/run/airlock``) get the same check, minus the "no group/other bits" rule
that only the broker's own root can promise (``check_dir(..., shared=True)``).
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path

#: The spool's subdirectories (workspace.py) and the fast path's socket directory.
SPOOL_DIRS = ("uploads", "results", "slots", "images")
#: The RAM spool's mount point in the state root (workspace.mount_ram_spool).
RAM_SPOOL = "ram"
SOCKETS_DIR = "sockets"
#: The flags every state file is opened with, on top of the caller's.
SAFE_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC
_HOW_TO_MOVE = "--state-dir, AIRLOCK_STATE_DIR or [broker] state_root"


class Problem(enum.StrEnum):
    """Why a state path was refused (the reason code in the message)."""

    SYMLINK = "STATE_PATH_IS_SYMLINK"
    NOT_DIRECTORY = "STATE_PATH_NOT_DIRECTORY"
    NOT_REGULAR = "STATE_FILE_NOT_REGULAR"
    WRONG_OWNER = "STATE_PATH_WRONG_OWNER"
    OPEN_MODE = "STATE_PATH_OPEN_MODE"
    HARD_LINKED = "STATE_FILE_HARD_LINKED"
    UNSAFE_ANCESTOR = "STATE_PATH_UNSAFE_ANCESTOR"
    NOT_ABSOLUTE = "STATE_PATH_NOT_ABSOLUTE"


class StateDirError(Exception):
    """A state path failed its check: the broker must not start on it."""

    def __init__(self, path: Path | str, problem: Problem, detail: str, todo: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.detail = detail
        self.todo = todo
        super().__init__(f"{problem.value}: {path}: {detail}; {todo}")


def default_state_root() -> Path:
    """``AIRLOCK_STATE_DIR``, else ``/var/lib/airlock`` as root, else the user's state dir."""
    env = os.environ.get("AIRLOCK_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/airlock")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "airlock"


def prepare_root(root: Path) -> None:
    """Make (0700) or check the state root and its spool directories; ``StateDirError`` if
    any is not the broker's alone."""
    if not root.is_absolute():
        raise StateDirError(root, Problem.NOT_ABSOLUTE, "the state root must be an absolute "
                            "path", f"configure one ({_HOW_TO_MOVE})")
    check_ancestors(root)
    os.makedirs(root.parent, 0o700, exist_ok=True)  # e.g. ~/.local/state: the user's own
    check_ancestors(root)  # again, now that every one exists
    ensure_dir(root)
    for name in SPOOL_DIRS:
        ensure_dir(root / name)
    if os.path.lexists(root / RAM_SPOOL):  # made when mounted; a dead broker's is reaped
        check_dir(root / RAM_SPOOL)


def prepare(root: Path, files: tuple[Path, ...]) -> None:
    """At start-up: the state root and its spool (``prepare_root``), and the directory of
    each state file (audit log, key) the configuration placed elsewhere."""
    prepare_root(root)
    for path in files:
        if path.parent != root:
            check_file_dir(path)


def prepare_key_dir(key: Path, root: Path) -> None:
    """``airlock-broker keys export``: the key's directory, as ``serve`` would check it."""
    if key.parent == root:
        check_ancestors(root)
        ensure_dir(root)
    else:
        check_file_dir(key)


def ensure_dir(path: Path, *, shared: bool = False) -> None:
    """``mkdir`` with the mode (0755 when ``shared``, else 0700), then ``check_dir``. An
    existing directory is never chmod-ed into shape: someone else's must be refused."""
    mode = 0o755 if shared else 0o700
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    else:
        os.chmod(path, mode, follow_symlinks=False)  # the umask may have narrowed it
    check_dir(path, shared=shared)


def check_dir(path: Path, *, shared: bool = False) -> None:
    """A real directory owned by the broker's euid; no group/other bits at all, or (``shared``)
    none that let others write. Raises ``StateDirError``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StateDirError(path, Problem.NOT_DIRECTORY, "it does not exist",
                            "create it, or let the broker create it") from None
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(path, Problem.SYMLINK, f"it is a symbolic link (to "
                            f"{os.readlink(path)!r}); the broker follows no link it did not "
                            "make", "replace it with a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(path, Problem.NOT_DIRECTORY, "it is not a directory",
                            f"remove it, or configure another state root ({_HOW_TO_MOVE})")
    _check_owner(path, st)
    forbidden = 0o022 if shared else 0o077
    if st.st_mode & forbidden:
        what = "writable by group or others" if st.st_mode & 0o022 else \
            "open to group or others"
        raise StateDirError(path, Problem.OPEN_MODE, f"its mode is "
                            f"{stat.S_IMODE(st.st_mode):04o}: {what} (allowed: "
                            f"{'at most 0755' if shared else '0700'})",
                            f"chmod {'755' if shared else '700'} it after checking nobody "
                            "else put anything in it, or remove it")


def check_ancestors(path: Path, *, what: str = "the state path",
                    elsewhere: str = f"choose another state root ({_HOW_TO_MOVE})") -> None:
    """Every directory above ``path`` (as written and as resolved) is root's or the broker's
    and not writable by others, unless sticky (``/tmp``): no one else can rename it away.
    ``what`` names ``path`` in the error; ``elsewhere`` says where else it could be."""
    for chain in (path, Path(os.path.realpath(path.parent)) / path.name):
        for parent in chain.parents:
            try:
                st = os.lstat(parent)
            except FileNotFoundError:
                continue  # made by ensure_dir's caller, then checked
            if stat.S_ISLNK(st.st_mode):
                continue  # its target is checked in the resolved chain
            if st.st_uid not in (0, os.geteuid()):
                raise StateDirError(parent, Problem.UNSAFE_ANCESTOR, f"a directory above "
                                    f"{what} {path} is owned by uid {st.st_uid}, who could "
                                    "move it away and replace it", elsewhere)
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise StateDirError(parent, Problem.UNSAFE_ANCESTOR, f"a directory above "
                                    f"{what} {path} is writable by others (mode "
                                    f"{stat.S_IMODE(st.st_mode):04o}, not sticky)",
                                    f"chmod go-w it, or {elsewhere}")


def check_file_dir(path: Path) -> None:
    """The directory of a state file the configuration put outside the root (an audit log
    in /var/log, a key elsewhere): made if missing (0700), then checked, ancestors too."""
    directory = path.parent
    check_ancestors(directory)
    if not os.path.lexists(directory):
        os.makedirs(directory, 0o700, exist_ok=True)
    check_dir(directory, shared=True)


def open_private_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that follows no link, then checks the file: regular, the broker's, one
    link, no group/other bits. ``StateDirError`` (descriptor closed) if not."""
    try:
        fd = os.open(path, flags | SAFE_OPEN, mode)
    except OSError:
        if os.path.islink(path):
            raise StateDirError(path, Problem.SYMLINK, "it is a symbolic link (to "
                                f"{os.readlink(path)!r}); the broker follows no link it did "
                                "not make", "remove it") from None
        raise
    try:
        check_private_file(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private_file(path: Path, st: os.stat_result) -> None:
    """What ``open_private_file`` requires of an opened state file's ``fstat``."""
    if not stat.S_ISREG(st.st_mode):
        raise StateDirError(path, Problem.NOT_REGULAR, "it is not a regular file",
                            "remove it")
    _check_owner(path, st)
    if st.st_nlink != 1:
        raise StateDirError(path, Problem.HARD_LINKED, f"it has {st.st_nlink} hard links: "
                            "another name may point at a file outside the state root",
                            "remove it (the broker makes a new one)")
    if st.st_mode & 0o077:
        raise StateDirError(path, Problem.OPEN_MODE, f"its mode is "
                            f"{stat.S_IMODE(st.st_mode):04o}; only the broker's user may "
                            "read or write it", "chmod 600 it, or remove it")


def _check_owner(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise StateDirError(path, Problem.WRONG_OWNER, f"it is owned by uid {st.st_uid}, not "
                            f"the broker's uid {os.geteuid()}: someone else made it first",
                            f"check what is in it, then remove it or chown it to uid "
                            f"{os.geteuid()}; or configure another state root ({_HOW_TO_MOVE})")


__all__ = ["RAM_SPOOL", "SAFE_OPEN", "SOCKETS_DIR", "SPOOL_DIRS", "Problem", "StateDirError",
           "check_ancestors", "check_dir", "check_file_dir", "check_private_file",
           "default_state_root", "ensure_dir", "open_private_file", "prepare", "prepare_key_dir",
           "prepare_root"]
