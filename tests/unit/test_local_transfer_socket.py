"""The fast path's socket at its seam: where it may live, and one hand-over on a socketpair."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.errors import AirlockError, Reason
from airlock_broker.fastpath.filesystems import filesystem_of
from airlock_broker.fastpath.local_transfer import LocalTransferServer, LocalTransferSettings, _bind
from airlock_broker.fastpath.peer_io import PeerIO
from airlock_client._local_transfer import read_reply
from tests.unit.hand_over import hand_over, two_steps


def test_config_section_loads_and_rejects_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[local_transfer]\nenabled = false\nsocket_path = "/run/a/t.sock"\n'
                    'socket_mode = 0o660\nallowed_filesystems = ["ext4", "zfs"]\n'
                    "io_threads = 2\n")
    cfg = BrokerConfig.load(good)
    assert cfg.local_transfer.allowed_filesystems == frozenset({"ext4", "zfs"})
    assert cfg.local_transfer.io_threads == 2
    assert cfg.local_transfer.enabled is False
    assert cfg.local_transfer.socket_path == Path("/run/a/t.sock")
    assert cfg.local_transfer.socket_mode == 0o660
    assert BrokerConfig().local_transfer.enabled is True  # safe by default: see the module
    bad = tmp_path / "bad.toml"
    bad.write_text("[local_transfer]\nallow_paths = true\n")
    with pytest.raises(ValueError, match="local_transfer"):
        BrokerConfig.load(bad)
    with pytest.raises(ValueError):
        LocalTransferSettings(socket_mode=0o4777)
    with pytest.raises(ValueError, match="allowed_filesystems"):
        LocalTransferSettings(allowed_filesystems=frozenset())
    with pytest.raises(ValueError, match="io_threads"):
        LocalTransferSettings(io_threads=0)


def test_the_socket_is_refused_under_a_directory_another_user_owns(tmp_path: Path) -> None:
    """Its own directory was checked, not those above it: under a directory of uid 1000's,
    that user renamed the socket's directory away and bound a socket of theirs at its name
    (found in review). The Unix socket's directory is held to the same rule."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 1000, 1000)
    with pytest.raises(ValueError, match="UNSAFE_ANCESTOR"):
        _bind(theirs / "sockets" / "t.sock", 0o666)
    assert not (theirs / "sockets").exists()


def test_the_socket_is_refused_in_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="writable by group or others"):
        _bind(shared / "t.sock", 0o666)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(ValueError, match="STATE_PATH_IS_SYMLINK"):
        _bind(link / "t.sock", 0o666)
    sock = _bind(tmp_path / "own" / "t.sock", 0o660)
    try:
        assert (tmp_path / "own").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "own" / "t.sock").stat().st_mode & 0o777 == 0o660
    finally:
        sock.close()


def test_a_hand_over_on_a_socketpair_attaches_or_refuses(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"abc")
    with open(tmp_path / "in", "rb") as fh:  # wherever the tests run: allowed here
        here = filesystem_of(fh.fileno())
    assert here is not None
    settings = LocalTransferSettings(allowed_filesystems=frozenset({here}))
    server = LocalTransferServer(settings, tmp_path / "unused", 1 << 20)
    ticket = server.table.issue("alice")

    def hand_over(message: bytes, fds: list[int]) -> dict[str, object]:
        return _hand_over(server, message, fds)

    in_fd = os.open(tmp_path / "in", os.O_RDONLY)
    out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        assert hand_over(b"not a ticket", [in_fd, out_fd])["reason"] == "LOCAL_FD_REFUSED"
        assert hand_over(ticket.encode(), [out_fd, out_fd])["reason"] == "LOCAL_FD_REFUSED"
        assert hand_over(ticket.encode(), [in_fd, out_fd])["reason"] == "LOCAL_HANDLE_INVALID"
        ticket = server.table.issue("alice")  # a refused hand-over gave its ticket back
        assert hand_over(ticket.encode(), [in_fd, out_fd]) == {"ok": True}
        files = server.claim(ticket, "alice")
        try:
            assert files.input_size == 3 and files.peer.pid == os.getpid()
            assert os.path.samestat(os.fstat(files.input_fd), os.fstat(in_fd))
        finally:
            files.close()
    finally:
        os.close(in_fd)
        os.close(out_fd)
        server.table.close()


def test_a_reply_queued_behind_a_reset_is_still_read() -> None:
    """The broker answered, then hung up with the client's request unread: the kernel reports
    ECONNRESET to the client's first read, the reply to its second."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.send(b'{"ok": false, "reason": "BUSY"}')
        ours.send(b"ticket")
        theirs.close()
        assert json.loads(read_reply(ours)) == {"ok": False, "reason": "BUSY"}


def test_hand_overs_are_refused_unread_while_every_close_thread_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closes of peer files that stopped answering hold every close thread: a new hand-over is
    refused (BUSY, so the client streams) before its descriptors are taken."""
    server = LocalTransferServer(LocalTransferSettings(), tmp_path / "unused", 1 << 20)
    monkeypatch.setattr(PeerIO, "closes_wedged", property(lambda _self: True))
    import airlock_broker.fastpath.local_transfer as local_transfer

    received: list[object] = []
    monkeypatch.setattr(local_transfer, "receive", lambda *a: received.append(a))
    (tmp_path / "in").write_bytes(b"abc")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    in_fd = os.open(tmp_path / "in", os.O_RDONLY)
    try:
        worker = threading.Thread(target=server.serve_connection, args=(theirs,))
        worker.start()
        with ours:
            reply = two_steps(ours, server.table.issue("a").encode(), [in_fd, in_fd])
        worker.join(10)
    finally:
        os.close(in_fd)
        server.table.close()
    assert reply["reason"] == "BUSY" and "stream instead" in reply["message"]
    assert received == []


def _hand_over(server: LocalTransferServer, message: bytes, fds: list[int]) -> dict[str, object]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = threading.Thread(target=server.serve_connection, args=(theirs,))
    worker.start()
    with ours:
        reply = hand_over(ours, message, fds)
    worker.join(60)
    return dict(reply)


def test_no_descriptor_is_looked_at_without_a_live_ticket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking a descriptor reads kernel tables and ``fstat``s the file, which on an overlay
    over FUSE waits for the FUSE daemon: the socket is 0666, so anyone with a made-up ticket
    could hold its threads there. The ticket is looked at first."""
    import airlock_broker.fastpath.local_transfer as local_transfer

    checked: list[int] = []
    monkeypatch.setattr(local_transfer, "check_input", lambda fd, *a: checked.append(fd))
    server = LocalTransferServer(LocalTransferSettings(), tmp_path / "unused", 1 << 20)
    (tmp_path / "in").write_bytes(b"abc")
    in_fd = os.open(tmp_path / "in", os.O_RDONLY)
    out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        made_up = _hand_over(server, b"A" * 43, [in_fd, out_fd])
        theirs = server.table.issue(f"uid:{os.getuid() + 1}", uid=os.getuid() + 1)
        foreign = _hand_over(server, theirs.encode(), [in_fd, out_fd])
    finally:
        os.close(in_fd)
        os.close(out_fd)
        server.table.close()
    assert made_up["reason"] == "LOCAL_HANDLE_INVALID"
    assert foreign["reason"] == "LOCAL_HANDLE_FOREIGN"
    assert checked == []


def test_closing_does_not_wait_for_a_hand_over_stuck_in_a_peers_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-over whose checks wait on a filesystem that stopped answering held the broker's
    shutdown for as long (``close`` gathered every connection)."""
    import asyncio

    import airlock_broker.fastpath.local_transfer as local_transfer

    release = threading.Event()
    stuck = threading.Event()

    def hangs(*_args: object) -> None:
        stuck.set()
        release.wait(300)

    monkeypatch.setattr(local_transfer, "check_input", hangs)
    settings = LocalTransferSettings(connection_timeout_seconds=1.0)
    server = LocalTransferServer(settings, tmp_path / "sockets" / "t.sock", 1 << 20)
    (tmp_path / "in").write_bytes(b"abc")

    async def scenario() -> None:
        assert await server.start()
        ticket = server.table.issue("alice")
        in_fd = os.open(tmp_path / "in", os.O_RDONLY)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await asyncio.to_thread(client.connect, os.fspath(server.path))
            assert await asyncio.to_thread(two_steps, client, ticket.encode(),
                                           [in_fd, in_fd]) is None
            assert await asyncio.to_thread(stuck.wait, 60)
            await asyncio.wait_for(server.close(), 30)
        finally:
            release.set()
            client.close()
            os.close(in_fd)

    asyncio.run(scenario())


def test_a_refused_hand_over_gives_its_ticket_back(tmp_path: Path) -> None:
    """Its client streams instead: a ticket kept for its TTL would count against the caller's
    tickets, and a client whose files are all refused (on NFS, say) would run out of them."""
    (tmp_path / "in").write_bytes(b"abc")
    with open(tmp_path / "in", "rb") as fh:
        here = filesystem_of(fh.fileno())
    assert here is not None
    settings = LocalTransferSettings(allowed_filesystems=frozenset({here}),
                                     max_tickets_per_caller=2)
    server = LocalTransferServer(settings, tmp_path / "unused", 1 << 20)
    in_fd = os.open(tmp_path / "in", os.O_RDONLY)
    try:
        for _ in range(5):  # the input twice: the output is refused
            ticket = server.table.issue("alice")
            assert _hand_over(server, ticket.encode(), [in_fd, in_fd])["reason"] \
                == "LOCAL_FD_REFUSED"
        assert len(server.table) == 0
    finally:
        os.close(in_fd)
        server.table.close()


def test_one_uid_cannot_hold_every_hand_over_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that waits on a filesystem that never answers holds its thread for good: one
    user with tickets (every local uid has them without [auth]) held all of them, and every
    other client's hand-over waited until it gave up. Its next one is BUSY at once now."""
    import asyncio

    import airlock_broker.fastpath.local_transfer as local_transfer

    release = threading.Event()
    stuck = threading.Semaphore(0)

    def hangs(*_args: object) -> None:
        stuck.release()
        release.wait(300)

    monkeypatch.setattr(local_transfer, "check_input", hangs)
    settings = LocalTransferSettings(max_connections=4, max_connections_per_uid=2,
                                     max_tickets_per_caller=8)
    server = LocalTransferServer(settings, tmp_path / "sockets" / "t.sock", 1 << 20)
    (tmp_path / "in").write_bytes(b"abc")

    async def hand_over(client: socket.socket, fd: int) -> dict[str, object] | None:
        await asyncio.to_thread(client.connect, os.fspath(server.path))
        client.settimeout(30)
        return await asyncio.to_thread(two_steps, client,
                                       server.table.issue("alice").encode(), [fd, fd])

    async def scenario() -> dict[str, object]:
        assert await server.start()
        fd = os.open(tmp_path / "in", os.O_RDONLY)
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
        try:
            for client in clients[:2]:
                assert await hand_over(client, fd) is None
            for _ in range(2):
                assert await asyncio.to_thread(stuck.acquire, True, 60)
            refused = await hand_over(clients[2], fd)  # refused at once, at the ticket
            assert refused is not None
            return refused
        finally:
            release.set()
            for client in clients:
                client.close()
            os.close(fd)
            await server.close()

    reply = asyncio.run(scenario())
    assert reply["reason"] == "BUSY", reply
    assert "max_connections_per_uid = 2" in str(reply["message"]), reply


def test_a_descriptor_whose_check_fails_is_refused_and_its_ticket_given_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``fstat`` that fails (EIO, ESTALE on a failing filesystem) escaped as an error: no
    reply, and the ticket was kept for its TTL, so a client whose files all fail so ran out."""
    import errno

    import airlock_broker.fastpath.local_transfer as local_transfer

    def fails(*_args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(local_transfer, "check_input", fails)
    server = LocalTransferServer(LocalTransferSettings(max_tickets_per_caller=2),
                                 tmp_path / "unused", 1 << 20)
    (tmp_path / "in").write_bytes(b"abc")
    in_fd = os.open(tmp_path / "in", os.O_RDONLY)
    try:
        for _ in range(5):
            reply = _hand_over(server, server.table.issue("alice").encode(), [in_fd, in_fd])
            assert reply["reason"] == "LOCAL_FD_REFUSED", reply
            assert "Input/output error" in str(reply["message"]), reply
        assert len(server.table) == 0
    finally:
        os.close(in_fd)
        server.table.close()


def test_the_server_holds_one_caller_to_its_share_of_the_tickets(tmp_path: Path) -> None:
    """``max_tickets_per_caller`` as the server's table applies it (the setting reached
    ``HandleTable`` only through the server)."""
    settings = LocalTransferSettings(max_tickets=32, max_tickets_per_caller=2)
    server = LocalTransferServer(settings, tmp_path / "unused", 1 << 20)
    try:
        server.table.issue("alice")
        server.table.issue("alice")
        with pytest.raises(AirlockError) as third:
            server.table.issue("alice")
        server.table.issue("bob")  # another caller is not held to alice's
    finally:
        server.table.close()
    assert third.value.reason is Reason.BUSY
    assert "max_tickets_per_caller = 2" in third.value.message


def test_a_users_subordinate_uids_share_its_hand_over_threads(tmp_path: Path) -> None:
    """Hand-overs count per user: a process of a subordinate uid (here this one's, made
    subordinate to user 7) is held to what the user's other uids already hold."""
    import asyncio

    from airlock_broker.security.uid_owners import UidOwners

    owners = UidOwners([(os.getuid(), os.getuid() + 1, 7)])
    settings = LocalTransferSettings(max_connections_per_uid=2)
    server = LocalTransferServer(settings, tmp_path / "sockets" / "t.sock", 1 << 20, owners)

    async def scenario() -> dict[str, object]:
        assert await server.start()
        server._per_user[7] = 2  # two hand-overs of the user's other uids, stuck
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await asyncio.to_thread(client.connect, os.fspath(server.path))
            client.settimeout(30)
            return dict(json.loads(await asyncio.to_thread(read_reply, client)))
        finally:
            client.close()
            await server.close()

    reply = asyncio.run(scenario())
    assert reply["reason"] == "BUSY", reply


def test_an_output_in_memory_is_refused(tmp_path: Path) -> None:
    """The broker's own thread writes the output: on tmpfs its pages were charged to the
    broker's memory for as long as the user kept the file (256 MiB seen, found in review).
    Outputs go on disk filesystems only (``output_filesystems``); the client streams."""
    shm = Path("/dev/shm")
    (tmp_path / "in").write_bytes(b"abc")
    out = shm / f"airlock-test-{os.getpid()}"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert filesystem_of(fd) == "tmpfs", "this test needs /dev/shm on tmpfs"
        server = LocalTransferServer(LocalTransferSettings(), tmp_path / "unused", 1 << 20)
        in_fd = os.open(tmp_path / "in", os.O_RDONLY)
        try:
            reply = _hand_over(server, server.table.issue("alice").encode(), [in_fd, fd])
        finally:
            os.close(in_fd)
            server.table.close()
    finally:
        os.close(fd)
        out.unlink()
    assert reply["reason"] == "LOCAL_FD_REFUSED", reply
    assert "'tmpfs'" in str(reply["message"]) and "output_filesystems" in str(reply["message"])
