"""The fast path's ticket table and descriptor checks, at their seam (a fake clock, real fds)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.errors import AirlockError
from airlock_broker.fastpath.filesystems import filesystem_of
from airlock_broker.fastpath.local_handles import (
    HandleTable,
    InputFile,
    LocalFiles,
    PeerCred,
    check_input,
    check_output,
)
from airlock_broker.fastpath.peer_io import PeerIO

PEER = PeerCred(pid=1, uid=1000, gid=1000)
IO = PeerIO(2, 1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _closed_soon(*fds: int) -> bool:
    """Closes happen on the fast path's own threads: shortly after ``close`` returns."""
    deadline = time.monotonic() + 60
    while any(_is_open(fd) for fd in fds) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not any(_is_open(fd) for fd in fds)


def _files(tmp_path: Path, out: str) -> LocalFiles:
    return LocalFiles(os.open(tmp_path / "in", os.O_RDONLY),
                      os.open(tmp_path / out, os.O_WRONLY | os.O_CREAT), InputFile(3, 4096),
                      PEER, IO)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[LocalFiles]:
    (tmp_path / "in").write_bytes(b"abc")
    made = _files(tmp_path, "out")
    yield made
    made.close()


def _reason(exc: pytest.ExceptionInfo[AirlockError]) -> str:
    return exc.value.reason.value


def test_a_ticket_is_single_use_and_bound_to_its_principal(files: LocalFiles) -> None:
    table = HandleTable(30, 4, Clock())
    ticket = table.issue("alice")
    assert len(ticket) >= 43 and ticket != table.issue("alice")
    table.attach(ticket, files)
    with pytest.raises(AirlockError) as foreign:
        table.claim(ticket, "bob")
    assert _reason(foreign) == "LOCAL_HANDLE_FOREIGN"
    assert table.claim(ticket, "alice") is files  # bob's try did not burn alice's ticket
    with pytest.raises(AirlockError) as again:
        table.claim(ticket, "alice")
    assert _reason(again) == "LOCAL_HANDLE_INVALID"
    assert _is_open(files.input_fd)  # the claimant owns them now


def test_a_second_attach_burns_the_ticket_and_closes_the_first(files: LocalFiles,
                                                               tmp_path: Path) -> None:
    table = HandleTable(30, 4, Clock())
    ticket = table.issue("alice")
    table.attach(ticket, files)
    other = _files(tmp_path, "out2")
    try:
        with pytest.raises(AirlockError) as burned:
            table.attach(ticket, other)
        assert _reason(burned) == "LOCAL_HANDLE_INVALID"
        assert _closed_soon(files.input_fd, files.output_fd)
        assert _is_open(other.input_fd)  # the caller still owns what was refused
        with pytest.raises(AirlockError):
            table.claim(ticket, "alice")
    finally:
        other.close()


def test_expired_tickets_are_refused_and_their_descriptors_closed(files: LocalFiles) -> None:
    clock = Clock()
    table = HandleTable(30, 4, clock)
    ticket = table.issue("alice")
    table.attach(ticket, files)
    clock.now += 30
    assert table.sweep() == 1 and len(table) == 0
    assert _closed_soon(files.input_fd, files.output_fd)  # closed on a PeerIO thread
    late = table.issue("alice")
    clock.now += 31
    with pytest.raises(AirlockError) as expired:
        table.claim(late, "alice")
    assert _reason(expired) == "LOCAL_HANDLE_INVALID" and "expired" in expired.value.message


def test_a_ticket_without_descriptors_is_refused_and_used_up() -> None:
    table = HandleTable(30, 4, Clock())
    ticket = table.issue("alice")
    with pytest.raises(AirlockError) as bare:
        table.claim(ticket, "alice")
    assert _reason(bare) == "LOCAL_HANDLE_INVALID" and len(table) == 0


def test_the_table_is_bounded_and_sweeps_before_refusing() -> None:
    clock = Clock()
    table = HandleTable(30, 2, clock)
    table.issue("a")
    table.issue("a")
    with pytest.raises(AirlockError) as busy:
        table.issue("a")
    assert _reason(busy) == "BUSY"
    clock.now += 31
    table.issue("a")  # the two expired ones made room


def test_close_closes_every_attached_descriptor(files: LocalFiles) -> None:
    table = HandleTable(30, 4, Clock())
    table.attach(table.issue("a"), files)
    table.close()
    assert _closed_soon(files.input_fd, files.output_fd)


def test_descriptor_checks(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"x" * 10)
    opened: list[int] = []

    def fd(path: Path, flags: int) -> int:
        opened.append(os.open(path, flags | os.O_CREAT, 0o600))
        return opened[-1]

    here = filesystem_of(fd(tmp_path / "in", os.O_RDONLY))
    assert here is not None
    allowed = {here}
    try:
        found = check_input(fd(tmp_path / "in", os.O_RDONLY), 10, allowed)
        assert found.size == 10 and found.allocated == os.stat(tmp_path / "in").st_blocks * 512
        for bad in (fd(tmp_path / "in", os.O_WRONLY), fd(tmp_path / "in", os.O_RDWR),
                    os.open(tmp_path, os.O_RDONLY)):
            with pytest.raises(AirlockError, match="LOCAL_FD_REFUSED"):
                check_input(bad, 10, allowed)
        opened.append(bad)
        with pytest.raises(AirlockError, match="TOO_LARGE"):
            check_input(fd(tmp_path / "in", os.O_RDONLY), 9, allowed)
        check_output(fd(tmp_path / "o1", os.O_WRONLY), allowed)
        check_output(fd(tmp_path / "o2", os.O_RDWR), allowed)
        for bad in (fd(tmp_path / "o3", os.O_RDONLY), fd(tmp_path / "in", os.O_WRONLY),
                    fd(tmp_path / "o4", os.O_WRONLY | os.O_APPEND)):
            with pytest.raises(AirlockError, match="LOCAL_FD_REFUSED"):
                check_output(bad, allowed)
        left, right = socket.socketpair()
        with left, right, pytest.raises(AirlockError, match="socket:"):
            check_input(left.fileno(), 10, allowed)
    finally:
        for f in opened:
            os.close(f)


def test_a_descriptor_on_a_filesystem_outside_the_allowlist_is_refused_naming_it(
        tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"x" * 10)
    with open(tmp_path / "in", "rb") as local, open("/proc/self/status", "rb") as proc, \
            open(tmp_path / "out", "wb") as out:
        here = filesystem_of(local.fileno())
        assert here is not None
        with pytest.raises(AirlockError, match="LOCAL_FD_REFUSED") as refused:
            check_input(proc.fileno(), 10, {here})
        assert "'proc' filesystem" in refused.value.message
        with pytest.raises(AirlockError, match=f"'{here}' filesystem"):
            check_input(local.fileno(), 10, {"xfs"} - {here} or {"btrfs"})
        with pytest.raises(AirlockError, match="output descriptor"):
            check_output(out.fileno(), {"tmpfs"} - {here} or {"btrfs"})
        r, w = os.pipe()
        try:
            with pytest.raises(AirlockError, match="pipe:"):
                check_input(r, 10, {here})
        finally:
            os.close(r)
            os.close(w)


def test_the_default_cap_takes_a_16_gib_input_and_refuses_a_byte_more(tmp_path: Path) -> None:
    """Issue #13's sizes on the same-host path: with the broker's default per-file cap, the
    hand-over (before any copy) takes a 16 GiB input and refuses one byte more, from its
    measured size (sparse files: nothing is read or written)."""
    cap = BrokerConfig().max_artifact_bytes
    assert cap == 16 * 1024**3
    for size, refused in ((cap, False), (cap + 1, True)):
        with (tmp_path / "in").open("wb") as fh:
            fh.truncate(size)
        fd = os.open(tmp_path / "in", os.O_RDONLY)
        try:
            allowed = {filesystem_of(fd) or ""}
            if refused:
                with pytest.raises(AirlockError, match=f"{cap + 1} bytes exceed the server "
                                                       f"maximum of {cap}"):
                    check_input(fd, cap, allowed)
            else:
                assert check_input(fd, cap, allowed).size == cap
        finally:
            os.close(fd)


def test_one_caller_cannot_take_every_ticket() -> None:
    """Each pending hand-over can hold one of the socket's connection threads: a caller with
    every ticket could stall them all."""
    table = HandleTable(30, 32, Clock(), per_principal=8)
    for _ in range(8):
        table.issue("uid:1001")
    with pytest.raises(AirlockError) as busy:
        table.issue("uid:1001")
    assert _reason(busy) == "BUSY" and "already has 8 local transfers" in str(busy.value)
    assert table.issue("uid:1002")  # another caller still gets one
    table.close()


def test_a_ticket_is_looked_at_before_any_descriptor(files: LocalFiles) -> None:
    """``expect`` refuses what ``attach`` would, with no descriptor to look at: an unknown
    ticket, one that has its descriptors, and a local user's ticket shown by another uid."""
    table = HandleTable(30, 4, Clock())
    with pytest.raises(AirlockError) as unknown:
        table.expect("A" * 43, PEER)
    assert _reason(unknown) == "LOCAL_HANDLE_INVALID"
    theirs = table.issue("uid:4242", uid=4242)
    with pytest.raises(AirlockError) as foreign:
        table.expect(theirs, PEER)  # uid 1000
    assert _reason(foreign) == "LOCAL_HANDLE_FOREIGN" and "uid 1000" in str(foreign.value)
    ours = table.issue("token:ci")  # a token's ticket: any uid may hand its files over
    table.expect(ours, PEER)
    table.attach(ours, files)
    with pytest.raises(AirlockError) as used:  # someone racing the owner: burned
        table.expect(ours, PEER)
    assert _reason(used) == "LOCAL_HANDLE_INVALID"
    with pytest.raises(AirlockError) as burned:
        table.claim(ours, "token:ci")
    assert _reason(burned) == "LOCAL_HANDLE_INVALID"
    assert _closed_soon(files.input_fd, files.output_fd)


def test_an_o_path_handle_is_no_input(tmp_path: Path) -> None:
    """Its access mode reads as O_RDONLY, but reading it fails (EBADF), which surfaced as
    INTERNAL; and it needs only search permission on the path."""
    (tmp_path / "in").write_bytes(b"abc")
    fd = os.open(tmp_path / "in", os.O_PATH)
    try:
        here = filesystem_of(fd)
        assert here is not None
        with pytest.raises(AirlockError) as refused:
            check_input(fd, 1 << 20, {here})
        assert _reason(refused) == "LOCAL_FD_REFUSED" and "O_PATH" in str(refused.value)
        with pytest.raises(AirlockError) as out:
            check_output(fd, {here})
        assert _reason(out) == "LOCAL_FD_REFUSED"
    finally:
        os.close(fd)
