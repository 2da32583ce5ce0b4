"""Tickets of the same-host fast path, and the checks every descriptor a peer sends must pass.

A ticket's life (DESIGN: the fast path never weakens authentication):

1. ``issue``: an authenticated gRPC call (``OpenLocalTransfer``, the ``convert`` role) gets a
   random 256-bit ticket bound to its principal, valid ``ttl`` seconds. At most
   ``max_entries`` tickets exist at once, and at most ``per_principal`` of one principal
   (``BUSY`` beyond), so a caller cannot make the broker hold descriptors without bound, nor
   take every ticket (and with them the socket's connection threads) from the others.
2. ``attach``: a peer on the Unix socket presents the ticket with two descriptors. The ticket
   is looked at first (``expect``: live, no descriptors yet, and for a local user's ticket
   a peer of that uid), and only then the descriptors (``check_input`` / ``check_output``):
   checking a descriptor reads kernel tables and ``fstat``s the file, which on an overlay over
   FUSE can wait for the FUSE daemon, so nobody without a ticket reaches it. The peer's
   credentials (``SO_PEERCRED``) are recorded with them. A ticket takes descriptors once: a
   second attach (someone else who learnt the ticket, racing the owner) *burns* it, closing
   what the first attached, so descriptors of unknown origin are never used.
3. ``claim``: the Convert call presenting the ticket must come from the same principal
   (``LOCAL_HANDLE_FOREIGN`` otherwise, and the ticket stays for its owner). Claiming removes
   the ticket: single use. An expired, unknown, used or descriptor-less ticket is
   ``LOCAL_HANDLE_INVALID``.

Whoever holds the descriptors closes them: the table until ``claim`` hands them over (then the
job's ``finally``), and ``sweep`` / ``close`` for expired and abandoned ones. A close runs on the
fast path's own threads (``PeerIO.close_later``): on FUSE it waits for the daemon, which may
never answer, and the callers include the event loop.

The checks: a descriptor must be on a filesystem from the allowlist, decided from the kernel's
tables before anything touches the file (filesystems.py: a hung filesystem would block even
``fstat``), then a regular file of the right access mode.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import NamedTuple

from airlock_broker.errors import Reason, error
from airlock_broker.fastpath.filesystems import filesystem_of
from airlock_broker.fastpath.peer_io import PeerIO


@dataclass(frozen=True)
class PeerCred:
    """Who was on the other end of the socket (``SO_PEERCRED``: set by the kernel)."""

    pid: int
    uid: int
    gid: int


class InputFile(NamedTuple):
    """What ``check_input`` found: the input's length, and the bytes it really occupies
    (``st_blocks``: a sparse file's length costs its owner nothing)."""

    size: int
    allocated: int


@dataclass
class LocalFiles:
    """The two descriptors a peer attached, already checked. Owned: ``close`` exactly once.
    ``io`` is the only place they may be read, written or closed (peer_io.py)."""

    input_fd: int
    output_fd: int
    input: InputFile
    peer: PeerCred
    io: PeerIO
    _closed: bool = field(default=False, repr=False)

    @property
    def input_size(self) -> int:
        return self.input.size

    def close(self) -> None:
        """Never blocks: the descriptors are closed on one of ``io``'s threads."""
        if self._closed:
            return
        self._closed = True
        self.io.close_later((self.input_fd, self.output_fd))


@dataclass
class _Entry:
    principal: str
    expires: float
    #: The uid the principal is, when the kernel said so (``SO_PEERCRED``): only a process
    #: of that uid may attach descriptors.
    uid: int | None = None
    files: LocalFiles | None = None
    #: Whom it counts against for ``per_principal`` (a subordinate uid's owner), if not
    #: ``principal``.
    counted_as: str = ""

    @property
    def quota(self) -> str:
        return self.counted_as or self.principal


class HandleTable:
    """Issued tickets. Thread-safe: the socket's connections are served on worker threads."""

    def __init__(self, ttl_seconds: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic, *,
                 per_principal: int | None = None) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self.per_principal = per_principal or max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def issue(self, principal: str, uid: int | None = None, counted_as: str = "") -> str:
        """A ticket for ``principal``; ``uid``: the uid it is, when the kernel said so;
        ``counted_as``: whom it counts against, when not ``principal`` (auth.Principal)."""
        self.sweep()
        ticket = secrets.token_urlsafe(32)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                raise error(Reason.BUSY, f"{self.max_entries} local transfers are already "
                                         "pending; retry shortly or stream")
            quota = counted_as or principal
            mine = sum(e.quota == quota for e in self._entries.values())
            if mine >= self.per_principal:
                raise error(Reason.BUSY, f"this caller already has {mine} local transfers "
                                         f"pending, the most one caller may "
                                         f"([local_transfer] max_tickets_per_caller = "
                                         f"{self.per_principal}); retry shortly or stream")
            self._entries[ticket] = _Entry(principal, self._clock() + self.ttl, uid,
                                           counted_as=counted_as)
        return ticket

    def expect(self, ticket: str, peer: PeerCred) -> None:
        """Refuse, before any descriptor is looked at, a hand-over ``attach`` would refuse
        anyway: an unknown, expired or already used ticket, or one issued to a local user
        (by uid) that a process of another uid presents. A ticket that already has
        descriptors is burned, as ``attach`` burns it."""
        burned: LocalFiles | None = None
        try:
            with self._lock:
                entry = self._live(ticket)
                if entry.uid is not None and entry.uid != peer.uid:
                    raise error(Reason.LOCAL_HANDLE_FOREIGN,
                                f"this ticket was issued to uid {entry.uid}; the process that "
                                f"presents it runs as uid {peer.uid}")
                if entry.files is not None:
                    burned = entry.files
                    del self._entries[ticket]
                    raise error(Reason.LOCAL_HANDLE_INVALID,
                                "this ticket already has descriptors; it is now revoked")
        finally:
            if burned is not None:
                burned.close()

    def revoke(self, ticket: str) -> None:
        """Forget ``ticket`` unless it holds descriptors: its hand-over was refused, and its
        client streams instead (else each refused hand-over held a ticket for a TTL, and a
        client whose files are all on, say, NFS ran out of them)."""
        with self._lock:
            entry = self._entries.get(ticket)
            if entry is not None and entry.files is None:
                del self._entries[ticket]

    def attach(self, ticket: str, files: LocalFiles) -> None:
        """Give ``files`` to ``ticket``. On success the table owns them; on error the caller
        still does (and must close them)."""
        burned: LocalFiles | None = None
        try:
            with self._lock:
                entry = self._live(ticket)
                if entry.files is not None:
                    burned = entry.files
                    del self._entries[ticket]
                    raise error(Reason.LOCAL_HANDLE_INVALID,
                                "this ticket already has descriptors; it is now revoked")
                entry.files = files
        finally:
            if burned is not None:
                burned.close()

    def claim(self, ticket: str, principal: str) -> LocalFiles:
        """The ticket's descriptors, for its principal only; the caller owns them from here."""
        with self._lock:
            entry = self._live(ticket)
            if entry.principal != principal:
                raise error(Reason.LOCAL_HANDLE_FOREIGN,
                            "this local-transfer ticket was issued to another principal")
            del self._entries[ticket]
        if entry.files is None:
            raise error(Reason.LOCAL_HANDLE_INVALID,
                        "no descriptors were attached to this ticket on the broker's socket")
        return entry.files

    def sweep(self) -> int:
        """Drop expired tickets, closing their descriptors; how many were dropped."""
        now = self._clock()
        with self._lock:
            dead = [t for t, e in self._entries.items() if e.expires <= now]
            gone = [self._entries.pop(t) for t in dead]
        for entry in gone:
            if entry.files is not None:
                entry.files.close()
        return len(gone)

    def close(self) -> None:
        with self._lock:
            gone = list(self._entries.values())
            self._entries.clear()
        for entry in gone:
            if entry.files is not None:
                entry.files.close()

    def _live(self, ticket: str) -> _Entry:
        """The entry for ``ticket`` (lock held); an expired one is removed and refused."""
        entry = self._entries.get(ticket)
        if entry is None:
            raise error(Reason.LOCAL_HANDLE_INVALID,
                        "unknown local-transfer ticket (never issued, already used, or expired)")
        if entry.expires <= self._clock():
            del self._entries[ticket]
            if entry.files is not None:
                entry.files.close()
            raise error(Reason.LOCAL_HANDLE_INVALID, "the local-transfer ticket expired")
        return entry


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def check_filesystem(fd: int, what: str, allowed: Set[str], peer_pid: int | None,
                     setting: str = "allowed_filesystems") -> str:
    """The descriptor's filesystem type, if it is in ``allowed`` (the ``[local_transfer]``
    ``setting``); asks nothing of the file."""
    try:
        found = filesystem_of(fd, peer_pid)
    except (OSError, ValueError) as exc:
        raise error(Reason.LOCAL_FD_REFUSED, f"the {what} descriptor's filesystem cannot be "
                                             f"determined ({exc}); stream instead") from None
    if found is None:
        raise error(Reason.LOCAL_FD_REFUSED,
                    f"the {what} descriptor ({_name(fd)}) is not a file on a filesystem "
                    "mounted where the broker can see it (a socket, a pipe, a memfd, a "
                    "detached mount)")
    if found not in allowed:
        raise error(Reason.LOCAL_FD_REFUSED,
                    f"the {what} descriptor is on a {found!r} filesystem; the same-host fast "
                    f"path accepts only {', '.join(sorted(allowed))} ([local_transfer] "
                    f"{setting}): the client streams instead")
    return found


def _name(fd: int) -> str:
    """What the kernel calls the descriptor (``socket:[…]``, ``pipe:[…]``, a path): for
    messages only, read from /proc without touching the file."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")[:200]
    except OSError:
        return f"descriptor {fd}"


def check_input(fd: int, max_bytes: int, allowed: Set[str],
                peer_pid: int | None = None) -> InputFile:
    """The input must be a regular file on an allowed filesystem, opened read-only, within
    the size limit."""
    check_filesystem(fd, "input", allowed, peer_pid)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise error(Reason.LOCAL_FD_REFUSED, f"the input descriptor is {_kind(st.st_mode)}, "
                                             "not a regular file")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH:  # its access mode reads as O_RDONLY, but it reads nothing
        raise error(Reason.LOCAL_FD_REFUSED, "the input descriptor is an O_PATH handle; open "
                                             "the file for reading")
    if flags & os.O_ACCMODE != os.O_RDONLY:
        raise error(Reason.LOCAL_FD_REFUSED, "the input descriptor must be opened read-only")
    if st.st_size > max_bytes:
        raise error(Reason.TOO_LARGE, f"the input's {st.st_size} bytes exceed the server "
                                      f"maximum of {max_bytes}")
    return InputFile(size=st.st_size, allocated=st.st_blocks * 512)


def check_output(fd: int, allowed: Set[str], peer_pid: int | None = None) -> None:
    """The output must be an empty regular file on an allowed filesystem, opened for writing,
    without ``O_APPEND`` (the broker writes at explicit offsets)."""
    check_filesystem(fd, "output", allowed, peer_pid,
                     "allowed_filesystems and output_filesystems")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise error(Reason.LOCAL_FD_REFUSED, f"the output descriptor is {_kind(st.st_mode)}, "
                                             "not a regular file")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH or flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
        raise error(Reason.LOCAL_FD_REFUSED, "the output descriptor is not opened for writing")
    if flags & os.O_APPEND:
        raise error(Reason.LOCAL_FD_REFUSED, "the output descriptor must not be in append mode")
    if st.st_size != 0:
        raise error(Reason.LOCAL_FD_REFUSED, "the output file must be new and empty")
