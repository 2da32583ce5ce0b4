"""Descriptors a peer may send over the broker's Unix sockets, and letting go of them.

Closing the last reference to a descriptor can wait on whoever made it. A TCP socket with
``SO_LINGER`` set and unsent data queued to a receiver that never reads makes ``close`` wait
for the linger time; and the kernel closes the descriptors still queued in a Unix socket when
that socket closes, so a message the broker never read does it too. Any local user could so
stop the broker's event loop on the identity socket (15 s of 16, for as long as they liked,
with no credentials at all), and hold every close thread of the fast-path socket (``BUSY``
for everyone). So:

- both listening sockets refuse descriptors (``SO_PASSRIGHTS`` 0, Linux 6.16+; accepted
  sockets inherit it): a peer's ``SCM_RIGHTS`` fails at its own ``sendmsg`` (``EPERM``). The
  fast-path socket allows them on one connection once it has presented a live ticket;
- every descriptor received is disarmed before it is closed: a socket gets ``SO_LINGER``
  on with a zero timeout, which closes at once;
- a connection is let go of by shutting it for reading and taking, disarming and closing
  whatever descriptors are still queued in it (on an older kernel, where nothing refuses
  them), then closing it.

Received descriptors are close-on-exec from the start (``MSG_CMSG_CLOEXEC``: Python 3.11's
``socket.recv_fds`` drops that flag).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import stat
import struct

#: ``SO_PASSRIGHTS`` (asm-generic/socket.h), which Python 3.11 does not name.
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)
#: ``struct linger``: on, with a zero timeout (close at once, the peer gets a reset).
_LINGER_NOW = struct.pack("ii", 1, 0)
#: The most descriptors one message can carry (``SCM_MAX_FD``).
_SCM_MAX_FD = 253


def _max_queued() -> int:
    """How many messages a peer can queue in one connection: ``net.unix.max_dgram_qlen``
    (the kernel lets one more in), 512 by default."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen", encoding="ascii") as qlen:
            return int(qlen.read()) + 1
    except (OSError, ValueError):
        return 513


_MAX_QUEUED = _max_queued()


def refuse_rights(sock: socket.socket) -> bool:
    """Make the kernel refuse descriptors sent to ``sock`` (and to the sockets accepted from
    it). False when this kernel cannot (before 6.16)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


def allow_rights(conn: socket.socket) -> None:
    """Let the peer of ``conn`` send descriptors (nothing to do where they were never
    refused)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 1)


def receive(conn: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int], int]:
    """One message, the descriptors that came with it (close-on-exec) and its flags."""
    fds = array.array("i")
    msg, ancdata, flags, _ = conn.recvmsg(size, socket.CMSG_SPACE(max_fds * fds.itemsize),
                                          socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds), flags


def disarm(fd: int) -> None:
    """Make closing ``fd`` immediate where it can be: a socket is set to linger for zero
    seconds. Anything else is left as it is."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return
        peer = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOW)
    except OSError:
        pass
    finally:
        peer.detach()  # still the caller's to close


def close_disarmed(fds: list[int]) -> None:
    for fd in fds:
        disarm(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


def let_go(conn: socket.socket, *, drain: bool = True) -> None:
    """Close ``conn`` without waiting on what its peer queued in it. With ``drain`` (a peer
    that may have sent descriptors): refuse more, shut it for reading (the peer's sends fail
    from then on), take and close, disarmed, whatever descriptors are still queued (at most
    as many messages as the kernel queues), then close. Never blocks on a socket; a queued
    descriptor of another kind closes as it would have anyway."""
    try:
        if drain:
            refuse_rights(conn)
            conn.shutdown(socket.SHUT_RD)
            conn.setblocking(False)
            for _ in range(_MAX_QUEUED):  # an empty read is the end or an empty message
                _msg, fds, _flags = receive(conn, 1, _SCM_MAX_FD)
                close_disarmed(fds)
    except OSError:  # drained (EAGAIN), or the peer is gone
        pass
    finally:
        conn.close()


__all__ = ["SO_PASSRIGHTS", "allow_rights", "close_disarmed", "disarm", "let_go", "receive",
           "refuse_rights"]
