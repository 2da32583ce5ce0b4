"""Who is on the other end of the broker's Unix socket: the kernel's answer, carried into gRPC.

gRPC Python does not tell a servicer who a Unix peer is: for a call on a ``unix:`` listener
(grpcio 1.85, checked) ``context.peer()`` is just ``"unix:"`` and ``auth_context()`` names
only the transport (``local``). So the broker asks the kernel itself, on a second socket
beside the gRPC one (``<socket>.id``, see ``security/exposure.identity_path``):

1. A client connects to the identity socket. The broker reads ``SO_PEERCRED`` (filled in by
   the kernel at ``connect``: a process cannot choose it), answers with a fresh random
   256-bit ticket bound to that uid, and closes. It reads nothing from the peer, so a silent
   peer holds nothing and the event loop never waits on one; and it takes no descriptors
   (``peer_rights``: refused by the kernel, Linux 6.16+), so none can make its close wait.
   On an older kernel a descriptor queued inside another (a TCP socket set to linger, inside
   a Unix socket) is out of the drain's reach, and the close of the connection that brought
   it waits as long as its sender likes: there each connection is closed on a thread of its
   own, at most ``CLOSE_THREADS`` at once (the socket accepts no more while they are held),
   never on the event loop (found by review: without credentials, a local user stopped
   every call of the broker for 15 s of each 15).
2. The client sends the ticket as call metadata (``PEER_TICKET_HEADER``) on one gRPC call
   over the Unix socket. The interceptor (auth.py) redeems it there: single use, at most
   ``ttl`` seconds old, and only on a call that arrived on the Unix listener. The caller's
   principal is then ``uid:N``.

Why a ticket and not a relay (a broker-side proxy that re-dials gRPC from a socket path naming
the peer's uid, so that ``context.peer()`` would carry it): the relay would copy every byte of
every upload through Python once more; the ticket costs one extra local ``connect`` per call.
Why it is sound: a ticket only ever crosses the two Unix sockets, never TCP; whoever holds one
got it from a process of that uid, and a process that hands its ticket on only lends its own
identity, which it could as well do by proxying its calls.

Bounded: at most ``per_uid`` unredeemed tickets per user (the oldest is dropped first), so one
user cannot crowd out another, and at most ``max_total`` in all. A user may own 65,536
subordinate uids (Debian's ``adduser``), and processes in a user namespace connect as each of
them: their tickets count as that user's (``/etc/subuid``, security/uid_owners.py), and the
total bound holds for users no file names. At the total bound the ticket
dropped is the oldest of the uid that holds the most (the asking uid's own first, if it holds
any): a genuine client holds one ticket for the milliseconds between getting and redeeming it,
so a flood pushes it out only once every uid holds one, which takes ``max_total`` uids at
once. (Dropping the oldest of all let 17 uids of 256 tickets push out a genuine ticket between
its issue and its redeem: 14 times in 100, measured.) Every expired ticket, of any uid, is
dropped as new ones are issued (tickets expire in the order they were issued: one TTL for all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from airlock_broker.daemon_pool import DaemonPool
from airlock_broker.fastpath.peer_rights import let_go, refuse_rights
from airlock_broker.security.uid_owners import UidOwners

log = logging.getLogger(__name__)

#: The call metadata that carries a ticket (lower case: gRPC metadata keys are).
PEER_TICKET_HEADER = "airlock-peer-ticket"
_MAX_TICKET = 64
#: struct ucred: pid_t pid; uid_t uid; gid_t gid (uid and gid are unsigned).
_UCRED = struct.Struct("=iII")


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of the Unix socket ``conn``, as
    the kernel recorded them at ``connect`` (``SO_PEERCRED``). Raises ``OSError``."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class PeerTickets:
    """Issued, unredeemed tickets. Thread-safe (issued on the loop, redeemed by interceptors).

    The bounds hold per user: a subordinate uid's tickets count as its owner's
    (``owners``, security/uid_owners.py); a ticket still names the uid that asked for it."""

    def __init__(self, ttl_seconds: float = 30.0, per_uid: int = 256, max_total: int = 4096,
                 clock: Callable[[], float] = time.monotonic,
                 owners: UidOwners | None = None) -> None:
        self.ttl = ttl_seconds
        self.per_uid = per_uid
        self.max_total = max_total
        self._clock = clock
        self._owners = owners or UidOwners()
        #: ticket -> (uid, owner, expiry), oldest first (= first to expire).
        self._by_ticket: OrderedDict[str, tuple[int, int, float]] = OrderedDict()
        self._by_owner: dict[int, OrderedDict[str, None]] = {}
        #: owners by how many tickets they hold (index 1 to ``per_uid``): whom to drop from.
        self._holders: list[dict[int, None]] = [{} for _ in range(per_uid + 1)]
        self._lock = threading.Lock()

    def issue(self, uid: int) -> str:
        ticket = secrets.token_urlsafe(32)
        now = self._clock()
        owner = self._owners.owner(uid)
        with self._lock:
            while self._by_ticket:  # every uid's expired tickets, oldest first
                oldest, (_uid, _owner, expires) = next(iter(self._by_ticket.items()))
                if expires > now:
                    break
                self._drop(oldest)
            mine = self._by_owner.get(owner)
            while mine and len(mine) >= self.per_uid:  # this user's oldest
                self._drop(next(iter(mine)))
                mine = self._by_owner.get(owner)
            while len(self._by_ticket) >= self.max_total:
                crowded = owner if owner in self._by_owner else self._most_held()
                self._drop(next(iter(self._by_owner[crowded])))
            mine = self._by_owner.setdefault(owner, OrderedDict())
            self._move(owner, len(mine), len(mine) + 1)
            mine[ticket] = None
            self._by_ticket[ticket] = (uid, owner, now + self.ttl)
        return ticket

    def _most_held(self) -> int:
        """An owner among those that hold the most tickets (lock held, some held)."""
        for holders in reversed(self._holders):
            if holders:
                return next(iter(holders))
        raise AssertionError("no ticket is held")

    def _move(self, owner: int, held: int, holds: int) -> None:
        """``owner`` went from ``held`` tickets to ``holds`` (lock held)."""
        if held:
            del self._holders[held][owner]
        if holds:
            self._holders[holds][owner] = None

    def redeem(self, ticket: str) -> int | None:
        """The uid the ticket was issued to, once; None if unknown, used or expired."""
        if len(ticket) > _MAX_TICKET:
            return None
        with self._lock:
            found = self._by_ticket.get(ticket)
            if found is None:
                return None
            self._drop(ticket)
        uid, _owner, expires = found
        return uid if expires > self._clock() else None

    def _drop(self, ticket: str) -> None:
        """Forget ``ticket`` (lock held)."""
        _uid, owner, _ = self._by_ticket.pop(ticket)
        mine = self._by_owner[owner]
        del mine[ticket]
        self._move(owner, len(mine) + 1, len(mine))
        if not mine:
            del self._by_owner[owner]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_ticket)


#: Connections closed at once where the kernel cannot refuse descriptors (see above).
CLOSE_THREADS = 4


class IdentityServer:
    """The identity socket: one ticket per connection, for the uid the kernel names."""

    def __init__(self, path: Path, tickets: PeerTickets) -> None:
        self.path = path
        self.tickets = tickets
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        #: Whether the kernel refuses descriptors sent to the socket; else closes go here.
        self._refused = True
        self._closes = DaemonPool(CLOSE_THREADS, "airlock-identity-close")

    def start(self) -> None:
        """Bind and start answering (``OSError`` if the socket cannot be made). The directory
        must already be the broker's own (``local_listeners`` checks it)."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(f"{self.path} exists and is not a socket: remove it")
            os.unlink(self.path)  # a previous broker's: the directory is ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # Before anyone can connect; accepted sockets inherit it.
            self._refused = refuse_rights(sock)
            sock.bind(os.fspath(self.path))
            # Connecting proves who you are; it grants nothing else.
            os.chmod(self.path, 0o666, follow_symlinks=False)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        if not self._refused:
            log.warning("identity socket: this kernel cannot refuse descriptors (SO_PASSRIGHTS, "
                        "Linux 6.16+): each connection is closed on a thread, %d at most at "
                        "once, and a local user who holds them all stops new local "
                        "identities (never the broker's other calls)", CLOSE_THREADS)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._closes.shutdown(wait=False)  # a close still waiting carries on alone
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        closes = asyncio.Semaphore(CLOSE_THREADS)
        while True:
            if not self._refused:
                await closes.acquire()  # a thread to close the next connection on
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: the socket must outlive them
                if not self._refused:
                    closes.release()
                log.warning("identity socket: accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            try:
                self.answer(conn)
            finally:
                if self._refused:  # nothing it could send can make its close wait
                    let_go(conn)
                else:
                    self._close_later(loop, conn, closes)

    def _close_later(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                     closes: asyncio.Semaphore) -> None:
        def close() -> None:
            try:
                let_go(conn)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits
                    loop.call_soon_threadsafe(closes.release)

        self._closes.run_anyway(close)

    def answer(self, conn: socket.socket) -> None:
        """Send ``conn``'s peer a ticket for its uid. Never blocks: a fresh socket's buffer
        takes one small message, and a peer that is already gone just gets nothing."""
        try:
            _pid, uid, _gid = peer_credentials(conn)
            conn.send(self.tickets.issue(uid).encode())
        except OSError as exc:
            log.debug("identity socket: peer left early: %s", exc)


__all__ = ["PEER_TICKET_HEADER", "IdentityServer", "PeerTickets", "peer_credentials"]
