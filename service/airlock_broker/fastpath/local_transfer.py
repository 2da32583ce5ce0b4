"""The same-host fast path's Unix socket: where a client hands the broker two descriptors.

Why: moving a 400 MB artifact and its output through Python gRPC costs seconds; on one
machine the client can instead pass its open input file and a fresh output file
(``SCM_RIGHTS``), and gRPC carries only the control messages (ticket, metadata, result
header, provenance, errors). No path from the peer is ever opened: only descriptors.

Security (the broker runs as root, so this socket is attack surface):

- **Where.** ``socket_path``'s directory must be a real directory (no symlink) owned by the
  broker's user and writable by no one else (0755 when the broker creates it), so nobody else
  can plant or replace the socket, and a client can check that before handing over its files.
  If it is not, the fast path is turned off with an error in the log; the broker still serves.
- **Who may connect.** The socket is 0666 by default (``socket_mode``): connecting grants
  nothing. Only a ticket does, and only an authenticated gRPC caller with the ``convert`` role
  gets one (``OpenLocalTransfer``); its Convert must present it again as the same principal
  (local_handles.py). A narrower mode would merely send some local users back to streaming.
- **What is accepted.** Two steps. First one message of at most 128 bytes, the ticket, and
  no descriptor: the kernel refuses any (``peer_rights``: ``SO_PASSRIGHTS`` 0 on the
  listening socket, Linux 6.16+), so nobody without a live ticket can make the broker hold,
  or wait to close, a descriptor of theirs. Once the ticket is live the broker allows
  descriptors on that connection and answers ``{"ready": true}``; then one message with
  exactly two: a regular file opened read-only, then an empty regular file opened for
  writing, both on a filesystem from ``allowed_filesystems`` (local ones: a FUSE or network
  filesystem can hang every access, filesystems.py), the output on a disk filesystem
  (``output_filesystems``: tmpfs pages would be the broker's memory); sizes within
  ``max_artifact_bytes``.
  Anything else (more or fewer descriptors, a FIFO, a directory, a socket, wrong access
  modes, another filesystem, a truncated message) is refused with a reason, and every
  received descriptor is disarmed (a socket's linger is cleared) and closed; they are
  close-on-exec from the start, so none leaks into a child process meanwhile.
  ``SO_PEERCRED`` is recorded in the audit log.
- **Bounded.** Each connection is served on a thread of the socket's own pool (silent peers
  cannot starve the broker's other threads) with a socket timeout, at most
  ``max_connections`` at once; tickets are few and short-lived (``HandleTable``). A flood of
  silent connections can only delay other local clients, which then stream. Copies from and
  to the descriptors, and their closes, run on threads of their own (``PeerIO``,
  ``io_threads``), never the event loop's default executor; when descriptors that stopped
  answering hold all of them, hand-overs are refused (``BUSY``, before any descriptor is
  received when the close threads are the ones held) and clients stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from airlock_broker.daemon_pool import DaemonPool
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.fastpath.filesystems import DEFAULT_ALLOWED, DEFAULT_OUTPUTS
from airlock_broker.fastpath.local_handles import (
    HandleTable,
    LocalFiles,
    PeerCred,
    check_input,
    check_output,
)
from airlock_broker.fastpath.peer_identity import peer_credentials
from airlock_broker.fastpath.peer_io import PeerIO
from airlock_broker.fastpath.peer_rights import (
    allow_rights,
    let_go,
    receive,
    refuse_rights,
    rights_refused,
)
from airlock_broker.security.exposure import SUN_PATH_MAX
from airlock_broker.security.state_dirs import StateDirError, check_ancestors, ensure_dir
from airlock_broker.security.uid_owners import UidOwners

log = logging.getLogger(__name__)

_MAX_MESSAGE = 128
_TICKET = re.compile(rb"[A-Za-z0-9_\-]{32,64}")


@dataclass(frozen=True)
class LocalTransferSettings:
    """``[local_transfer]``. On by default: it grants nothing the gRPC listener does not (a
    ticket needs an authenticated ``convert`` call), and it fails closed (off, logged) when
    the socket's directory is not the broker's own."""

    enabled: bool = True
    #: Default: beside the broker's Unix socket, else in the state root's ``sockets/``
    #: (BrokerConfig.transfer_socket_path).
    socket_path: Path | None = None
    #: Connecting grants nothing without a ticket: 0666 lets every local user who may call the
    #: gRPC port use the fast path. 0660/0600 restrict it to the broker's group/user.
    socket_mode: int = 0o666
    ticket_ttl_seconds: float = 30.0
    max_tickets: int = 32
    #: Of those, how many one caller may hold: each pending hand-over can hold one of the
    #: socket's ``max_connections`` threads, and one caller must not take them all.
    max_tickets_per_caller: int = 8
    max_connections: int = 16
    #: Of those, how many one user's hand-overs may hold at once (its subordinate uids, in
    #: /etc/subuid, count as its own). A check that waits on a
    #: filesystem that never answers (an overlay over a FUSE mount) holds its thread for good:
    #: one user with tickets could otherwise hold every one, and the fast path stayed off for
    #: everyone. The next hand-over of that uid is BUSY at once (its client streams). Four:
    #: a client converting four files at once hands over four at a time.
    max_connections_per_uid: int = 4
    connection_timeout_seconds: float = 5.0
    #: Filesystem types (as in /proc/self/mountinfo) a peer's descriptors may be on. Local
    #: ones only: a FUSE or network filesystem can block every read and close for ever.
    allowed_filesystems: frozenset[str] = DEFAULT_ALLOWED
    #: Of those, where an output may be: disk filesystems only. On tmpfs (or an overlay,
    #: whose upper layer may be tmpfs) the pages the broker writes are charged to the
    #: broker's memory for as long as the user keeps the file (filesystems.py).
    output_filesystems: frozenset[str] = DEFAULT_OUTPUTS
    #: Threads that copy from and to peer descriptors (never the default executor's): at most
    #: this many fast-path copies at once. A descriptor that stops answering holds one until
    #: its filesystem answers; the job itself ends at its deadline.
    io_threads: int = 4
    #: How long a job waits for a free copy thread before BUSY.
    io_wait_seconds: float = 30.0

    def __post_init__(self) -> None:
        # From TOML it is a list; a set it must be (and frozen, as the rest).
        object.__setattr__(self, "allowed_filesystems", frozenset(self.allowed_filesystems))
        object.__setattr__(self, "output_filesystems", frozenset(self.output_filesystems))
        if not self.allowed_filesystems:
            raise ValueError("allowed_filesystems must not be empty (enabled = false turns "
                             "the fast path off)")
        if not self.allowed_filesystems & self.output_filesystems:
            raise ValueError("output_filesystems has none of allowed_filesystems: no output "
                             "could be handed over (enabled = false turns the fast path off)")
        if self.io_threads <= 0 or self.io_wait_seconds <= 0:
            raise ValueError("io_threads and io_wait_seconds must be positive")
        if self.socket_mode & ~0o777:
            raise ValueError("socket_mode must be a permission mode (0o000-0o777)")
        if self.max_connections_per_uid <= 0:
            raise ValueError("max_connections_per_uid must be positive")
        if not 0 < self.ticket_ttl_seconds <= 300:
            raise ValueError("ticket_ttl_seconds must be in (0, 300]")
        if self.max_tickets <= 0 or self.max_connections <= 0 \
                or self.max_tickets_per_caller <= 0:
            raise ValueError("max_tickets, max_tickets_per_caller and max_connections must be "
                             "positive")
        if self.connection_timeout_seconds <= 0:
            raise ValueError("connection_timeout_seconds must be positive")


class LocalTransferServer:
    """Accepts descriptor hand-overs on the socket and files them under their tickets."""

    def __init__(self, settings: LocalTransferSettings, path: Path,
                 max_artifact_bytes: int, owners: UidOwners | None = None) -> None:
        self.settings = settings
        #: Whose a peer's uid is (a subordinate uid is its owner's): the per-user bound.
        self.owners = owners or UidOwners()
        self.path = path
        self.max_artifact_bytes = max_artifact_bytes
        self.table = HandleTable(settings.ticket_ttl_seconds, settings.max_tickets,
                                 per_principal=settings.max_tickets_per_caller)
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._conns: set[asyncio.Task[None]] = set()
        #: Hand-overs under way (or stuck) per user: a peer's uid, or its owner's when it is
        #: a subordinate uid (touched on the loop only).
        self._per_user: dict[int, int] = {}
        # Its own threads: peers that connect and stay silent must not occupy the loop's
        # default executor, which spooling and validation use. Daemon threads: a check that
        # blocks in a peer's filesystem must not keep the broker from exiting.
        self._threads = DaemonPool(settings.max_connections, "airlock-local")
        #: Where the descriptors are copied and closed (LocalFiles carry it).
        self.io = PeerIO(settings.io_threads, settings.io_wait_seconds)

    async def start(self) -> bool:
        """Bind the socket; False (and an error logged) when it cannot be offered safely."""
        try:
            self._sock = _bind(self.path, self.settings.socket_mode)
        except (OSError, ValueError) as exc:
            log.error("same-host fast path OFF: %s", exc)
            return False
        if not rights_refused(self._sock):
            log.warning("same-host fast path: this kernel cannot refuse descriptors before a "
                        "ticket (SO_PASSRIGHTS, Linux 6.16+): they are taken and closed "
                        "disarmed instead")
        self._tasks = [asyncio.create_task(self._accept_loop()),
                       asyncio.create_task(self._sweep_loop())]
        log.info("same-host fast path on %s (mode %o)", self.path, self.settings.socket_mode)
        return True

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conns:  # a hand-over whose checks wait on a peer's filesystem: not for ever
            _done, stuck = await asyncio.wait(
                self._conns, timeout=self.settings.connection_timeout_seconds + 1)
            for task in stuck:  # its (daemon) thread is left to the kernel
                task.cancel()
        self._threads.shutdown(wait=False)
        self.io.shutdown()
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
        self.table.close()

    def claim(self, ticket: str, principal: str) -> LocalFiles:
        return self.table.claim(ticket, principal)

    async def _sweep_loop(self) -> None:
        """Expired tickets' descriptors are closed within a TTL, not at the next ``issue``."""
        while True:
            await asyncio.sleep(self.settings.ticket_ttl_seconds)
            self.table.sweep()

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: the socket must outlive them
                self._slots.release()
                log.warning("local transfer socket: accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            except BaseException:
                self._slots.release()
                raise
            try:
                peer = _peer(conn)
            except OSError as exc:  # gone already
                log.info("local transfer connection dropped: %s", exc)
                self._let_go(conn, loop)
                continue
            user = self.owners.owner(peer.uid)
            if self._per_user.get(user, 0) >= self.settings.max_connections_per_uid:
                self._refuse_at_once(conn, peer.uid)
                self._let_go(conn, loop)
                continue
            self._per_user[user] = self._per_user.get(user, 0) + 1
            task = asyncio.create_task(self._serve(conn, peer, user))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def _let_go(self, conn: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Close a connection the accept loop will not serve, and give its place back: here
        when the kernel refused it descriptors, as nothing queued can make that close wait;
        else (before Linux 6.16) on a close thread, the place held until it is done. A
        socket queued inside a Unix socket is out of the drain's reach (peer_rights), and its
        close on the loop stopped every call of the broker (found by review)."""
        if self._sock is not None and rights_refused(self._sock):
            let_go(conn)
            self._slots.release()
            return

        def release() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits
                loop.call_soon_threadsafe(self._slots.release)

        self.io.let_go_later(conn, release)

    def _refuse_at_once(self, conn: socket.socket, uid: int) -> None:
        """BUSY on the loop, unread: a fresh socket's buffer takes one small message without
        blocking, and a peer that is gone just gets nothing. (The caller closes it.)"""
        limit = self.settings.max_connections_per_uid
        reply = _refusal(error(Reason.BUSY, f"uid {uid} (or the user whose subordinate uid "
                               f"it is) already has {limit} same-host hand-overs under "
                               f"way (max_connections_per_uid = {limit}); stream instead"))
        try:
            conn.setblocking(False)
            conn.send(json.dumps(reply).encode())
        except OSError as exc:
            log.info("local transfer connection dropped: %s", exc)
        log.info("local transfer refused (uid %d): %d hand-overs under way", uid, limit)

    async def _serve(self, conn: socket.socket, peer: PeerCred, user: int) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._threads,
                                                             self.serve_connection, conn, peer)
        except Exception:
            log.exception("local transfer connection failed")
        finally:  # not reached while a check waits on a filesystem: that counts for its user
            self._slots.release()
            left = self._per_user.pop(user, 1) - 1
            if left:
                self._per_user[user] = left

    def serve_connection(self, conn: socket.socket, peer: PeerCred | None = None) -> None:
        """One hand-over (blocking: runs on a worker thread); ``peer``: its credentials, when
        the accept loop read them already. Closes ``conn``."""
        try:
            conn.settimeout(self.settings.connection_timeout_seconds)
            reply = self._receive(conn, peer or _peer(conn))
            conn.sendall(json.dumps(reply).encode())
        except OSError as exc:
            log.info("local transfer connection dropped: %s", exc)
        finally:  # drained if a live ticket allowed descriptors (peer_rights)
            let_go(conn)

    def _receive(self, conn: socket.socket, peer: PeerCred) -> dict[str, object]:
        fds: list[int] = []
        owned = False
        allowed = self.settings.allowed_filesystems
        try:
            if self.io.closes_wedged:  # taking descriptors now could only queue their closes
                raise error(Reason.BUSY, f"all {self.io.threads} threads that close same-host "
                            "descriptors are waiting for filesystems that stopped answering; "
                            "stream instead")
            msg, fds, flags = receive(conn, _MAX_MESSAGE)
            if fds:  # a kernel that does not refuse them (before 6.16), or an older client
                raise error(Reason.LOCAL_FD_REFUSED, "descriptors before the ticket: send the "
                                                     "ticket alone first")
            if flags & socket.MSG_TRUNC or not _TICKET.fullmatch(msg):
                raise error(Reason.LOCAL_FD_REFUSED, "the message is not a ticket")
            ticket = msg.decode()
            self.table.expect(ticket, peer)  # the ticket before its descriptors
            try:
                allow_rights(conn)
                conn.sendall(json.dumps({"ready": True}).encode())
                msg, fds, flags = receive(conn, _MAX_MESSAGE)
                if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                    raise error(Reason.LOCAL_FD_REFUSED, "message or descriptors truncated: "
                                                         "too many descriptors or too long")
                if len(fds) != 2:
                    raise error(Reason.LOCAL_FD_REFUSED,
                                f"expected 2 descriptors (input, output), got {len(fds)}")
                try:
                    found = check_input(fds[0], self.max_artifact_bytes, allowed, peer.pid)
                    check_output(fds[1], allowed & self.settings.output_filesystems,
                                 peer.pid)
                except OSError as exc:  # fstat of a failing filesystem: EIO, ESTALE
                    raise error(Reason.LOCAL_FD_REFUSED, "the descriptors could not be "
                                f"checked: {exc.strerror or exc}") from None
                if self.io.copies_wedged:
                    raise error(Reason.BUSY, f"all {self.io.threads} same-host copy threads "
                                "are held by descriptors that stopped answering; stream "
                                "instead")
            except (AirlockError, OSError):
                self.table.revoke(ticket)  # its client streams instead
                raise
            self.table.attach(ticket, LocalFiles(fds[0], fds[1], found, peer, self.io))
            owned = True
            log.debug("descriptors attached by pid %d uid %d", peer.pid, peer.uid)
            return {"ok": True}
        except AirlockError as exc:
            log.info("local transfer refused (pid %d uid %d): %s", peer.pid, peer.uid, exc)
            return _refusal(exc)
        finally:
            if not owned:  # not here: a close of a refused FUSE file waits for its daemon
                self.io.close_later(fds)


def _refusal(exc: AirlockError) -> dict[str, object]:
    """The reply to a hand-over that is refused (its client streams instead)."""
    return {"ok": False, "reason": exc.reason.value, "message": exc.message}


def _peer(conn: socket.socket) -> PeerCred:
    return PeerCred(*peer_credentials(conn))


def _bind(path: Path, mode: int) -> socket.socket:
    """The listening socket at ``path``, in a directory only the broker's user can write."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(f"socket path {path} is longer than {SUN_PATH_MAX} bytes")
    try:
        # Every directory above it too: one another user may write could be renamed away
        # and the socket's name taken (as the Unix socket's directory is held).
        check_ancestors(path.parent)
        ensure_dir(path.parent, shared=True)  # 0755 made; else the broker's, nobody else may write
    except StateDirError as exc:
        raise ValueError(str(exc)) from None
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{path} exists and is not a socket")
        os.unlink(path)  # a previous broker's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        refuse_rights(sock)  # before anyone can connect (peer_rights)
        sock.bind(os.fspath(path))  # mode from the umask until the chmod: not wider than 0777
        os.chmod(path, mode, follow_symlinks=False)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


