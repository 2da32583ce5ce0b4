"""Where an output is written before it is renamed into place, and what a killed run left.

An output (one converted file, a model directory) is written as ``.NAME.XXXXXXXX.part``
(a directory: ``.airlock-part``) beside its destination and renamed at the end, so that a
reader never sees half of it. A run that ends in any ordinary way removes it. A run that is
killed (SIGKILL, a third Ctrl-C, power loss) cannot: the next conversion to the same
destination removes what such runs left, and only that:

- each temporary output is locked (``flock``) by the process writing it for as long as it
  exists; the kernel drops the lock when that process dies, however it dies;
- a leftover is a name of exactly that form, for that destination, a regular file or a
  directory (never a link: nothing is followed) that this user owns, whose lock can be taken
  and which has not been modified for ``STALE_SECONDS`` (a run between creating its file and
  locking it is never mistaken for a dead one). A directory in a shared one (``/tmp``) may
  have been made under our name by anyone: another user's is left alone, whatever it holds,
  and a tree too deep to remove (Python 3.11's ``rmtree`` recurses) is left, not raised;
- only on a local filesystem (``LOCAL_FILESYSTEMS``, read from the kernel's mount table):
  on a network filesystem a lock may not reach a run on another host, so nothing is swept
  there. Where ``flock`` is refused altogether, a run writes without a lock, and a sweep,
  refused the lock too, removes nothing;
- only where no one else can give an entry that name (``names_are_ours``): a directory that
  this user or root owns and that no one else may write (the user's own personal group
  aside), or that has the sticky bit. In a
  team's ``2775`` any member can rename a tree of the user's to a leftover's name, which keeps
  its owner and its age, and the user's next conversion would remove it. Leftovers there
  stay until the user removes them (``rm -r .NAME.*.airlock-part``);
- a file's name (``.part``) must be a regular file, a directory's (``.airlock-part``) a
  directory.

A temporary output's name is only a name: in a directory others may write that is not sticky
(a team's ``2775``), any of them can rename it away and put a link to anywhere in its place
while the conversion runs. So nothing is done to it by its name that a link would carry
elsewhere: its mode is set through the descriptor ``Part`` holds (``set_mode``), a directory
is written through that descriptor (``inside``: ``/proc/self/fd/N``, the directory itself
wherever its name points), and the name is checked to be it just before and after the rename
that puts it in place (``replace``, ``placed_as``: ``OutputSwapped`` otherwise). A directory
is removed through a descriptor of its own, checked to be it (``remove_tree``): what is inside
is removed through that descriptor, entering no subdirectory that someone else could have
moved there (``_empty``), and only the emptied directory by its name, if the name is still
it. A file is unlinked by name only while the name is still it.

Imports nothing heavy: ``airlock convert`` uses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from airlock_client._errors import AirlockError
from airlock_client._umask import umask

FILE_SUFFIX = ".part"
DIR_SUFFIX = ".airlock-part"
#: How long a temporary output must have been left unmodified before it may be a leftover.
STALE_SECONDS = 60.0
#: What ``tempfile`` puts between the prefix and the suffix.
_RANDOM = r"[a-z0-9_]{8}"
#: Kernel-backed local filesystems, where a ``flock`` held by any process on the machine is
#: seen by every other: the only ones swept.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay",
                               "f2fs", "zfs"})
#: ``flock`` refused by the filesystem itself (some network and cluster filesystems).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class OutputSwapped(AirlockError, OSError):
    """An output's name no longer names it: someone who can write its directory renamed it
    away or put something else there (``Part.check_named``). An ``OSError`` too: what
    handles a failed placement (a full disk, a directory at the name) handles this."""

    reason = "OUTPUT_SWAPPED"

    def __init__(self, name: Path) -> None:
        sentence = ("renamed or replaced by someone else while it was written: others may "
                    "write to its directory; write the output to one only you can write, or "
                    "one with the sticky bit")
        super().__init__(f"{name} was {sentence}")
        self.errno, self.strerror, self.filename = errno.ESTALE, sentence, str(name)
        self.path = name


@dataclass
class Part:
    """A temporary output, locked by this process until ``release()`` (in a ``finally``,
    after ``replace`` or ``remove``). A file's ``fd`` is open for writing and the caller's
    to close (e.g. by ``os.fdopen``); a directory has none (-1). ``_handle`` is this run's
    own descriptor of it (holding the lock where the filesystem has ``flock``)."""

    path: Path
    fd: int
    _handle: int
    _ident: tuple[int, int]
    _placed: bool = False

    def release(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)
            self._handle = -1

    @property
    def inside(self) -> Path:
        """A temporary directory itself, whatever its name points to now: write into it
        through this, never through ``path``."""
        return Path(f"/proc/self/fd/{self._handle}")

    def set_mode(self, mode: int) -> None:
        """Give it ``mode`` (mkstemp and mkdtemp make it private) through the descriptor: a
        ``chmod`` by name follows whatever link was put there, to the user's own files."""
        os.fchmod(self._handle, mode)

    def check_named(self, name: Path) -> None:
        """Raise ``OutputSwapped`` unless ``name`` is this temporary output (not a link,
        not another file, not nothing)."""
        try:
            named: tuple[int, int] | None = identity(name)
        except FileNotFoundError:
            named = None
        if named != self._ident:
            raise OutputSwapped(name)

    def placed_as(self, output: Path) -> None:
        """After a rename of ``path`` to ``output``: check ``output`` is it, and from now on
        leave it to ``remove``."""
        self.check_named(output)
        self._placed = True

    def replace(self, output: Path) -> None:
        """Rename it to ``output`` (replacing what is there), checking the name before and
        after."""
        self.check_named(self.path)
        os.replace(self.path, output)
        self.placed_as(output)

    def place_file(self, output: Path) -> None:
        """A finished file: given the mode a new file has (mkstemp made it 0600), then
        renamed to ``output`` (``replace``)."""
        self.set_mode(0o666 & ~umask())
        self.replace(output)

    def remove(self) -> None:
        """Unless it was put in place, remove it by its name, if the name is still it. A
        name taken from it (renamed by someone else, or by this run just before an
        exception) is left alone, and so is whatever it names now. Errors are not raised (a
        ``finally`` calls it)."""
        if self._placed or self._handle < 0:
            return
        with contextlib.suppress(OSError, RecursionError):  # OutputSwapped is one
            if self.fd == -1:
                remove_tree(self.path, self._ident)
            else:
                self.check_named(self.path)
                os.unlink(self.path)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def identity(path: Path) -> tuple[int, int]:
    """What ``path`` itself is (a link is not followed): for ``remove_tree``."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_tree(path: Path, ident: tuple[int, int]) -> bool:
    """Remove the directory ``path`` if it is still ``ident`` (``identity``); whether it was.
    Its contents are removed through a descriptor of it, never through ``path``, so a tree
    that someone else renamed to ``path`` meanwhile is left alone; the emptied directory goes
    by its name only if the name is still it. Follows no link, and enters no subdirectory that
    someone else could have moved in (``_empty``). Raises ``OSError`` (and
    ``RecursionError``, for a tree deeper than ~1000 levels) when something cannot be
    removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link at the name: not it
            return False
        raise
    try:
        top = os.fstat(fd)
        if (top.st_dev, top.st_ino) != ident:
            return False
        _empty(fd, _unreachable(top))
    finally:
        os.close(fd)
    try:
        if identity(path) != ident:
            return False
        os.rmdir(path)
    except FileNotFoundError:
        return False
    return True


def _empty(directory: int, private: bool) -> None:
    """Remove what is in the open directory ``directory``, through descriptors.

    A subdirectory is entered only if nobody else could have moved it in: ``private`` (no one
    else can reach ``directory``: it, or a directory above it in this walk, is this user's
    and others may not search it), or the subdirectory is this user's and no one else may
    write it (moving a directory to another parent takes write permission on it). Another,
    in an output made group-writable by the umask, may be a tree of the user's that a group
    member moved in from elsewhere (a file moved in only loses a name its mover could have
    removed). It is left, and so the directory holding it is not removed (``OSError``)."""
    with os.scandir(directory) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if not is_dir:
            os.unlink(name, dir_fd=directory)
            continue
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=directory)
        try:
            st = os.fstat(sub)
            if not (private or _sealed(st)):
                continue  # perhaps moved in: left, and its parent with it
            _empty(sub, private or _unreachable(st))
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=directory)


def _sealed(st: os.stat_result) -> bool:
    """This user's, and no one else may write it."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _unreachable(st: os.stat_result) -> bool:
    """This user's, and no one else may search it (nothing below it can be reached by
    others, whatever its own modes)."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IXGRP | stat.S_IXOTH)


def new_file(output: Path) -> Part:
    """A new ``.NAME.XXXXXXXX.part`` beside ``output`` (mode 0600), locked by this process
    until ``release``. The lock is held through a descriptor of its own, so that closing
    ``fd`` before the rename does not let another run take the file for a leftover."""
    sweep(output)
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=FILE_SUFFIX,
                                dir=output.parent)
    try:
        handle = _held(os.dup(fd))  # one open file description, one lock
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return Part(Path(name), fd, handle, _identity(handle))


def new_dir(output: Path) -> Part:
    """A new ``.NAME.XXXXXXXX.airlock-part`` directory beside ``output`` (mode 0700), locked
    by this process until ``release``.

    ``mkdtemp`` gives a name, not a descriptor: in a directory others may write, one of them
    can rename the new directory away and a directory of the user's to its name before it is
    opened (a rename within one directory needs no permission on what it moves). What is
    opened must be what ``mkdtemp`` makes, the user's, 0700 and empty, or ``OutputSwapped``
    is raised and nothing is removed."""
    sweep(output)
    path = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=DIR_SUFFIX,
                                 dir=output.parent))
    try:
        handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: what mkdtemp made, not a tree put in its place
        raise
    try:
        st = os.fstat(handle)
        fresh = st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700 \
            and not os.listdir(handle)
    except BaseException:
        os.close(handle)
        raise
    if not fresh:
        os.close(handle)
        raise OutputSwapped(path)
    try:
        handle = _held(handle)  # closes it on failure
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return Part(path, -1, handle, _identity(handle))


def _held(fd: int) -> int:
    """``fd``, holding an exclusive ``flock`` of what it opened where the filesystem has
    ``flock`` (where it refuses, no sweep can take the lock either); closed on any other
    error."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return fd
        os.close(fd)
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep(output: Path, *, now: float | None = None) -> list[str]:
    """Remove the temporary outputs for ``output`` that killed runs left (see the module's
    docstring); the names removed. Errors are not raised: a leftover that cannot be removed
    is left as it is."""
    prefix = f".{output.name}."
    pattern = re.compile(re.escape(prefix) + _RANDOM
                         + f"({re.escape(FILE_SUFFIX)}|{re.escape(DIR_SUFFIX)})")
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        parent = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return removed
    try:
        if not names_are_ours(os.fstat(parent)):
            return removed
        with os.scandir(parent) as entries:
            names = [e.name for e in entries
                     if e.name.startswith(prefix) and pattern.fullmatch(e.name)]
        if names and _on_local_filesystem(parent):
            removed = [n for n in names if _remove_if_left(parent, n, now)]
    except OSError:
        pass
    finally:
        os.close(parent)
    return removed


def names_are_ours(directory: os.stat_result) -> bool:
    """Whether only this user (or root) can give an entry of ``directory`` a name: it is this
    user's or root's, and no one else may write it or it has the sticky bit (where only an
    entry's owner may rename it). Group or other write bits also stand for an ACL that lets
    someone else write (they show its mask). A group write bit is no one else's where the
    group is the user's own personal group (``_personal_group``: umask 002 makes every
    directory of such a user 0775)."""
    if directory.st_uid not in (os.geteuid(), 0):
        return False
    if directory.st_mode & stat.S_ISVTX or not directory.st_mode & (stat.S_IWGRP
                                                                     | stat.S_IWOTH):
        return True
    return not directory.st_mode & stat.S_IWOTH and directory.st_uid == os.geteuid() \
        and _personal_group(directory.st_gid)


def _personal_group(gid: int) -> bool:
    """Whether ``gid`` is this user's own group (a user private group: named as the user and
    listing no members); False when either cannot be looked up."""
    import grp
    import pwd

    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.geteuid())
    except (KeyError, OSError):
        return False
    return group.gr_name == user.pw_name and not group.gr_mem and user.pw_gid == gid


def _on_local_filesystem(fd: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``fd`` is on one of ``LOCAL_FILESYSTEMS``, from the kernel's tables (its
    mount id in fdinfo, that mount's type in mountinfo), never asking the filesystem (a
    network one may not answer). False when they cannot be read (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in
                      (proc / "self" / "fdinfo" / str(fd)).read_text().splitlines()
                      if ":" in line)
        mount = fields["mnt_id"].strip()
        for line in (proc / "self" / "mountinfo").read_text().splitlines():
            head, sep, tail = line.partition(" - ")
            if sep and head.split(" ", 1)[0] == mount:
                return tail.split(" ", 1)[0] in LOCAL_FILESYSTEMS
    except (OSError, KeyError, ValueError):
        pass
    return False


def _remove_if_left(parent: int, name: str, now: float) -> bool:
    """Remove ``name`` in the directory ``parent`` if it is a leftover; whether it was."""
    try:
        st = os.lstat(name, dir_fd=parent)
        if st.st_uid != os.geteuid() or now - st.st_mtime < STALE_SECONDS:
            return False  # another user's (never ours to remove), or perhaps a live run's
        if stat.S_ISDIR(st.st_mode) and name.endswith(DIR_SUFFIX):
            flags = os.O_RDONLY | os.O_DIRECTORY
        elif stat.S_ISREG(st.st_mode) and not name.endswith(DIR_SUFFIX):  # FILE_SUFFIX
            flags = os.O_RDONLY
        else:
            return False  # a link, a special file, or not what its name says: never ours
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return False
    try:
        opened = os.fstat(fd)
        if (opened.st_ino, opened.st_dev, opened.st_uid) != (st.st_ino, st.st_dev, st.st_uid):
            return False  # replaced between the look and the open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its run is alive (or the filesystem has no locks)
        try:
            if stat.S_ISDIR(st.st_mode):
                _empty(fd, _unreachable(opened))  # through the descriptor checked above
                os.rmdir(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        except (OSError, RecursionError):  # RecursionError: a tree deeper than ~1000 levels
            return False
        return True
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (``renameat2`` with ``RENAME_EXCHANGE``,
    Linux 3.15, most local filesystems): a finished output replaces an earlier one with no
    moment when neither is there. False where the kernel, the filesystem or the C library
    cannot (then rename twice)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    failure = ctypes.get_errno()
    if failure in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # EPERM: a seccomp filter that refuses syscalls it does not know
    raise OSError(failure, os.strerror(failure), str(b))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
