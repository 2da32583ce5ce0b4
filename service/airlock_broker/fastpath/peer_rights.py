"""Descriptors a peer may send over the broker's Unix sockets, and letting go of them.

Closing the last reference to a descriptor can wait on whoever made it. A TCP socket with
``SO_LINGER`` set and unsent data queued to a receiver that never reads makes ``close`` wait
for the linger time; and the kernel closes the descriptors still queued in a Unix socket when
that socket closes, so a message the broker never read does it too. Any local user could so
stop the broker's event loop on the identity socket (15 s of 16, for as long as they liked,
with no credentials at all), and hold every close thread of the fast-path socket (``BUSY``
for everyone). So:

- both listening sockets refuse descriptors (``SO_PASSRIGHTS`` 0, Linux 6.16+; set before
  ``bind``, so accepted sockets inherit it): a peer's ``SCM_RIGHTS`` fails at its own
  ``sendmsg`` (``EPERM``). The fast-path socket allows them on one connection once it has
  presented a live ticket. This is the guarantee, and it needs the kernel: what follows
  only narrows what an older kernel lets through, and what a ticket holder can do;
- every descriptor received is disarmed before it is closed: a socket gets ``SO_LINGER``
  on with a zero timeout, which closes at once;
- a connection that may hold descriptors (an older kernel's, or one whose ticket allowed
  them) is shut for reading and drained of a bounded number of messages, their descriptors
  disarmed, before it is closed.

What is left, and bounded elsewhere: a socket inside a received Unix socket is not reached
(nor a FUSE file, whose close waits for its daemon), and a peer can queue more messages than
the drain reads. Those closes run on the fast path's close threads, at most four per user;
when all are held, hand-overs are ``BUSY`` and clients stream (peer_io.py). Only a ticket
holder can reach them from Linux 6.16 on.

Received descriptors are close-on-exec from the start (``MSG_CMSG_CLOEXEC``: Python 3.11's
``socket.recv_fds`` drops that flag).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct

#: ``SO_PASSRIGHTS`` (asm-generic/socket.h), which Python 3.11 does not name.
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)
#: ``struct linger``: on, with a zero timeout (close at once, the peer gets a reset).
_LINGER_NOW = struct.pack("ii", 1, 0)
#: The most descriptors one message can carry (``SCM_MAX_FD``).
_SCM_MAX_FD = 253


#: The most messages drained from a connection before it is closed (a peer's send buffer,
#: not ``max_dgram_qlen``, bounds how many it can queue: 278 empty ones at the default).
_MAX_QUEUED = 512


def refuse_rights(sock: socket.socket) -> bool:
    """Make the kernel refuse descriptors sent to ``sock`` (and to the sockets accepted from
    it). False when this kernel cannot (before 6.16)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


def rights_refused(sock: socket.socket) -> bool:
    """Whether the kernel refuses descriptors sent to ``sock``."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS) == 0
    except OSError:
        return False


def allow_rights(conn: socket.socket) -> None:
    """Let the peer of ``conn`` send descriptors (nothing to do where they were never
    refused)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 1)


def receive(conn: socket.socket, size: int) -> tuple[bytes, list[int], int]:
    """One message, the descriptors that came with it (close-on-exec) and its flags. Room is
    made for as many as a message can carry: the kernel closes those that do not fit itself,
    inside ``recvmsg``, before they could be disarmed (10 lingering sockets, 2 over a room
    for 8, held it 10 s)."""
    fds = array.array("i")
    msg, ancdata, flags, _ = conn.recvmsg(size, socket.CMSG_SPACE(_SCM_MAX_FD * fds.itemsize),
                                          socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds), flags


def disarm(fd: int) -> None:
    """Make closing ``fd`` immediate where it can be: a socket is set to linger for zero
    seconds. Anything else is left as it is."""
    try:  # not fstat: on FUSE it asks the daemon; a non-socket is ENOTSOCK here
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


def let_go(conn: socket.socket) -> None:
    """Close ``conn``. If its peer may have sent descriptors (an older kernel, or a
    connection whose ticket allowed them): refuse more, shut it for reading (the peer's sends
    fail from then on), take and close, disarmed, the descriptors of up to ``_MAX_QUEUED``
    queued messages, then close (see the module docstring for what this does not reach)."""
    try:
        if not rights_refused(conn):
            refuse_rights(conn)
            conn.shutdown(socket.SHUT_RD)
            conn.setblocking(False)
            for _ in range(_MAX_QUEUED):  # an empty read is the end or an empty message
                _msg, fds, _flags = receive(conn, 1)
                close_disarmed(fds)
    except OSError:  # drained (EAGAIN), or the peer is gone
        pass
    finally:
        conn.close()


__all__ = ["SO_PASSRIGHTS", "allow_rights", "close_disarmed", "disarm", "let_go", "receive",
           "refuse_rights", "rights_refused"]
