"""Nobody can make the broker wait to close a descriptor of theirs (``peer_rights``).

The attack: a TCP socket with ``SO_LINGER`` set and unsent data queued to a receiver that
never reads makes the ``close`` of its last reference wait for the linger time; sent over one
of the broker's Unix sockets and closed by the sender, the broker holds that last reference.
On the code before (seen): the identity socket, which anyone may connect to, stopped the
broker's event loop for the whole linger time; four such messages on the fast-path socket,
none with a ticket, held all four close threads, and every genuine hand-over was ``BUSY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airlock_broker.fastpath import local_transfer, peer_identity
from airlock_broker.fastpath.filesystems import filesystem_of
from airlock_broker.fastpath.local_transfer import LocalTransferServer, LocalTransferSettings
from airlock_broker.fastpath.peer_identity import IdentityServer, PeerTickets
from airlock_broker.fastpath.peer_rights import close_disarmed, receive, rights_refused
from airlock_client._local_transfer import read_reply
from tests.unit.hand_over import hand_over

#: How long closing the attacker's socket would wait: far beyond what the tests allow.
_LINGER = 30


@pytest.fixture
def lingering() -> Iterator[Callable[[], socket.socket]]:
    """Makes TCP sockets whose close waits ``_LINGER`` s: their data cannot leave, since
    their peers read nothing (until the fixture ends)."""
    made: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def make() -> socket.socket:
            sock = socket.create_connection(listener.getsockname())
            made.append(listener.accept()[0])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, _LINGER))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.send(b"\0" * 65536)
            return sock

        try:
            yield make
        finally:
            for peer in made:  # their data can go now: a close still waiting ends
                peer.close()


def _send_and_let_go(path: Path, message: bytes, sock: socket.socket) -> bool:
    """Connect to ``path`` and send ``message`` with ``sock``, as an attacker would, keeping
    the connection open (in ``_held``). Whether the kernel let the descriptor through."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(os.fspath(path))
    _held.append(conn)
    try:
        socket.send_fds(conn, [message], [sock.fileno()])
    except PermissionError:  # EPERM: the broker takes no descriptor here
        return False
    return True


_held: list[socket.socket] = []


def _drop(sock: socket.socket, sent: bool) -> None:
    """Close the attacker's own copy: at once where it went through (the broker's copy, in
    flight or taken, is then the last); on a thread where the kernel refused it, since then
    this one is the last, whose close waits until the fixture lets its data go."""
    if sent:
        sock.close()
    else:
        threading.Thread(target=sock.close, daemon=True).start()


def _answered(conn: socket.socket) -> bool:
    try:
        return bool(conn.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


async def _longest_stop(seconds: float) -> float:
    """The longest the event loop stopped during ``seconds``."""
    longest, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        await asyncio.sleep(0.05)
        longest = max(longest, time.monotonic() - began - 0.05)
    return longest


def _identity_attacked(path: Path, attack: Callable[[IdentityServer], None]) -> tuple[float, str]:
    """Start an identity socket at ``path``, run ``attack`` on it before the loop runs again
    (so what it sends is queued before the broker accepts), then: the longest the event loop
    stopped in the next 3 s, and the ticket a client asking after that gets."""
    async def scenario() -> tuple[float, str]:
        server = IdentityServer(path, PeerTickets())
        server.start()
        try:
            attack(server)
            stop = await _longest_stop(3.0)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with client:
                client.setblocking(False)
                await asyncio.get_running_loop().sock_connect(client, os.fspath(server.path))
                ticket = await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(client, 64), 10)
            return stop, ticket.decode()
        finally:
            for conn in _held:
                conn.close()
            _held.clear()
            await server.close()

    return asyncio.run(scenario())


def _send_inside_a_socket(path: Path, lingering: Callable[[], socket.socket]) -> None:
    """Send ``path`` a Unix socket holding a lingering TCP socket in its queue, leaving the
    broker's copy the last reference to both."""
    sending, queued = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with sending:
        sock = lingering()
        socket.send_fds(sending, [b"y"], [sock.fileno()])
        sock.close()  # the copy queued in ``queued`` is the last
    assert _send_and_let_go(path, b"not a ticket", queued)
    queued.close()  # the broker's copy is the last


def test_the_identity_socket_takes_no_descriptor_that_could_stop_the_loop(
        tmp_path: Path, lingering: Callable[[], socket.socket]) -> None:
    def attack(server: IdentityServer) -> None:
        assert rights_refused(server._sock)  # type: ignore[arg-type]
        sock = lingering()
        _drop(sock, _send_and_let_go(server.path, b"x", sock))

    stop, ticket = _identity_attacked(tmp_path / "broker.sock.id", attack)
    assert stop < 2.0, f"the event loop stopped for {stop:.1f} s"
    assert len(ticket) >= 32


def test_on_an_older_kernel_a_descriptor_inside_another_cannot_stop_the_loop(
        tmp_path: Path, lingering: Callable[[], socket.socket],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by review: before Linux 6.16 the kernel lets descriptors through, and the drain
    # does not reach a lingering socket queued inside a Unix socket sent to the identity
    # socket: its close, on the event loop, stopped every call for the whole linger time.
    monkeypatch.setattr(peer_identity, "refuse_rights", lambda sock: False)  # that kernel
    stop, ticket = _identity_attacked(
        tmp_path / "broker.sock.id", lambda server: _send_inside_a_socket(server.path, lingering))
    assert stop < 2.0, f"the event loop stopped for {stop:.1f} s"
    assert len(ticket) >= 32  # and the next local client still gets its ticket


def test_messages_without_a_ticket_cannot_hold_the_close_threads(
        tmp_path: Path, lingering: Callable[[], socket.socket]) -> None:
    (tmp_path / "in").write_bytes(b"abc")
    with open(tmp_path / "in", "rb") as fh:
        here = filesystem_of(fh.fileno())
    assert here is not None
    settings = LocalTransferSettings(allowed_filesystems=frozenset({here}),
                                     max_connections_per_uid=8)  # the attacker is this uid
    server = LocalTransferServer(settings, tmp_path / "sockets" / "t.sock", 1 << 20)

    async def scenario() -> dict[str, object]:
        assert await server.start()
        try:
            assert rights_refused(server._sock)  # type: ignore[arg-type]
            sent = []
            for _ in range(settings.io_threads):  # a close thread each, on the code before
                sock = lingering()
                sent.append(_send_and_let_go(server.path, b"not a ticket", sock))
                _drop(sock, sent[-1])
            deadline = time.monotonic() + 30
            # Where the kernel let them through, the broker refuses them (not tickets) and
            # closes their descriptors: once it answered, those closes are queued.
            while not all(_answered(conn) for conn, went in zip(_held, sent, strict=True) if went):
                assert time.monotonic() < deadline, "no refusal came"
                await asyncio.sleep(0.05)
            in_fd = os.open(tmp_path / "in", os.O_RDONLY)
            out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                client.settimeout(10)
                await asyncio.to_thread(client.connect, os.fspath(server.path))
                ticket = server.table.issue("alice")
                return await asyncio.to_thread(hand_over, client, ticket.encode(),
                                               [in_fd, out_fd])
            finally:
                client.close()
                os.close(in_fd)
                os.close(out_fd)
        finally:
            for conn in _held:
                conn.close()
            _held.clear()
            await server.close()

    reply = asyncio.run(scenario())
    assert reply == {"ok": True}, reply


def test_on_an_older_kernel_a_refused_hand_over_cannot_stop_the_loop(
        tmp_path: Path, lingering: Callable[[], socket.socket],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by review (the identity socket's twin): a uid over its hand-overs was refused
    # and closed on the event loop, and before Linux 6.16 a lingering socket queued inside a
    # Unix socket it sent made that close wait, with no ticket needed.
    monkeypatch.setattr(local_transfer, "refuse_rights", lambda sock: False)  # that kernel
    settings = LocalTransferSettings(allowed_filesystems=frozenset({"ext4"}),
                                     max_connections_per_uid=1)  # the attacker is this uid
    server = LocalTransferServer(settings, tmp_path / "sockets" / "t.sock", 1 << 20)

    async def scenario() -> float:
        assert await server.start()
        try:
            assert not rights_refused(server._sock)  # type: ignore[arg-type]
            holder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            holder.connect(os.fspath(server.path))  # silent: holds the uid's one hand-over
            _held.append(holder)
            _send_inside_a_socket(server.path, lingering)
            return await _longest_stop(3.0)
        finally:
            for conn in _held:
                conn.close()
            _held.clear()
            await server.close()

    stop = asyncio.run(scenario())
    assert stop < 2.0, f"the event loop stopped for {stop:.1f} s"


def test_descriptors_are_received_close_on_exec() -> None:
    """Python 3.11's ``socket.recv_fds`` drops ``MSG_CMSG_CLOEXEC`` (seen: not set)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        socket.send_fds(ours, [b"m"], [0])
        msg, fds, _flags = receive(theirs, 16)
        try:
            assert msg == b"m" and len(fds) == 1
            assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            for fd in fds:
                os.close(fd)


def test_every_descriptor_of_a_message_is_taken_before_any_is_closed(
        lingering: Callable[[], socket.socket]) -> None:
    """Room for only 8 made the kernel close the rest itself, inside ``recvmsg``, before they
    could be disarmed: 10 lingering sockets held it 2 x their linger (found in review)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socks = [lingering() for _ in range(10)]
    with ours, theirs:
        socket.send_fds(ours, [b"m"], [s.fileno() for s in socks])
        for sock in socks:
            sock.close()  # in flight: the broker's copies are the last
        began = time.monotonic()
        _msg, fds, flags = receive(theirs, 16)
        took = time.monotonic() - began
        close_disarmed(fds)
    assert len(fds) == 10 and not flags & socket.MSG_CTRUNC
    assert took < _LINGER / 2, f"receive took {took:.1f} s"


def test_descriptors_sent_with_the_ticket_are_refused(tmp_path: Path) -> None:
    """Where the kernel lets them through (a socketpair, or a kernel before 6.16), the ticket
    still comes first: descriptors sent with it are closed, disarmed, and refused."""
    server = LocalTransferServer(LocalTransferSettings(), tmp_path / "unused", 1 << 20)
    (tmp_path / "in").write_bytes(b"abc")
    in_fd = os.open(tmp_path / "in", os.O_RDONLY)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = threading.Thread(target=server.serve_connection, args=(theirs,))
    worker.start()
    try:
        with ours:
            socket.send_fds(ours, [server.table.issue("alice").encode()], [in_fd, in_fd])
            reply = json.loads(read_reply(ours))
        worker.join(30)
    finally:
        os.close(in_fd)
        server.table.close()
    assert reply["reason"] == "LOCAL_FD_REFUSED"
    assert "descriptors before the ticket" in reply["message"]
