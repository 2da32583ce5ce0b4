"""The fast path's own threads: bounded, with deadlines, and a stall there takes nothing else.

A copy that blocks for ever is played by a function waiting on an event (a read on a hung
filesystem cannot be interrupted either); tests/adversarial/test_broker_exhaustion.py plays
the real thing, a FUSE file whose daemon never answers.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from airlock_broker.daemon_pool import DaemonPool
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.fastpath.peer_io import PeerIO


def _deadline(seconds: float) -> object:
    end = time.monotonic() + seconds

    def watchdog() -> float:
        left = end - time.monotonic()
        if left <= 0:
            raise error(Reason.DEADLINE_EXCEEDED, "over")
        return left

    return watchdog


def test_a_copy_runs_on_duplicates_it_closes_itself(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    seen: list[int] = []

    def read(dup: int) -> bytes:
        seen.append(dup)
        assert threading.current_thread().daemon
        return os.pread(dup, 5, 0)

    async def main() -> bytes:
        io = PeerIO(2, 1.0)
        try:
            return await io.run(read, (fd,), _deadline(5))  # type: ignore[arg-type]
        finally:
            io.shutdown()

    try:
        assert asyncio.run(main()) == b"hello"
        assert seen and seen[0] != fd
        with pytest.raises(OSError):
            os.fstat(seen[0])  # the duplicate is closed (the number is not reused meanwhile)
        os.fstat(fd)  # the original is the caller's
    finally:
        os.close(fd)


def test_stalled_copies_are_given_up_at_their_deadline_and_wedge_nothing_else(
        tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    release = threading.Event()

    def stall(_dup: int) -> None:
        release.wait(30)

    async def main() -> None:
        io = PeerIO(2, 0.3)
        try:
            began = time.monotonic()
            for _ in range(2):
                with pytest.raises(AirlockError, match="DEADLINE_EXCEEDED"):
                    await io.run(stall, (fd,), _deadline(0.2))  # type: ignore[arg-type]
            assert time.monotonic() - began < 5
            assert io.abandoned == 2 and io.copies_wedged
            # Both threads are held by stalled copies: the next copy is BUSY at once.
            began = time.monotonic()
            with pytest.raises(AirlockError) as busy:
                await io.run(stall, (fd,), _deadline(5))  # type: ignore[arg-type]
            assert busy.value.reason is Reason.BUSY and "2 held by" in busy.value.message
            assert time.monotonic() - began < 5  # at once, not after the 5 s deadline
            # Meanwhile the loop and its default executor are untouched.
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
            release.set()  # the filesystem answers at last: the threads come back
            deadline = time.monotonic() + 10
            while io.abandoned and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert io.abandoned == 0 and not io.copies_wedged
            assert await io.run(lambda d: os.pread(d, 1, 0), (fd,), _deadline(5)) == b"x"  # type: ignore[arg-type]
        finally:
            release.set()
            io.shutdown()

    try:
        asyncio.run(main())
    finally:
        os.close(fd)


def test_a_job_waits_for_a_busy_copy_thread_at_most_wait_seconds(tmp_path: Path) -> None:
    release = threading.Event()

    async def main() -> None:
        io = PeerIO(1, 0.6)
        try:
            first = asyncio.ensure_future(io.run(lambda: release.wait(30), (),
                                                 _deadline(30)))  # type: ignore[arg-type]
            await asyncio.sleep(0.1)
            began = time.monotonic()
            with pytest.raises(AirlockError, match="BUSY"):  # busy, not stalled: it waited
                await io.run(lambda: None, (), _deadline(30))  # type: ignore[arg-type]
            assert 0.5 < time.monotonic() - began < 5
            release.set()
            await first
            await io.run(lambda: None, (), _deadline(30))  # type: ignore[arg-type]
        finally:
            release.set()
            io.shutdown()

    asyncio.run(main())


def test_a_failing_copy_raises_its_own_error() -> None:
    def fail() -> None:
        raise error(Reason.TOO_LARGE, "big")

    async def main() -> None:
        io = PeerIO(1, 1.0)
        try:
            with pytest.raises(AirlockError, match="TOO_LARGE"):
                await io.run(fail, (), _deadline(5))  # type: ignore[arg-type]
            assert io.abandoned == 0
        finally:
            io.shutdown()

    asyncio.run(main())


def test_closes_never_block_the_caller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On FUSE ``close`` waits for the daemon's FLUSH: the caller (the event loop) must not."""
    release = threading.Event()
    real_close = os.close
    blocked: list[int] = []

    def slow_close(fd: int) -> None:
        blocked.append(fd)
        release.wait(30)
        real_close(fd)

    io = PeerIO(2, 1.0)
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(3)]
    monkeypatch.setattr("airlock_broker.fastpath.peer_io.os.close", slow_close)
    try:
        began = time.monotonic()
        for fd in fds:
            io.close_later([fd])
        assert time.monotonic() - began < 5  # the slow closes run on threads, not here
        assert io.closes_wedged  # two threads blocked, one close queued
    finally:
        release.set()
        deadline = time.monotonic() + 10
        while io.closes_wedged and time.monotonic() < deadline:
            time.sleep(0.01)
        io.shutdown()
    assert not io.closes_wedged and sorted(blocked) == sorted(fds)


def test_the_daemon_pool_is_bounded_and_its_threads_do_not_hold_up_exit() -> None:
    pool = DaemonPool(2, "t")
    release = threading.Event()
    running: list[str] = []

    def work() -> str:
        running.append(threading.current_thread().name)
        release.wait(10)
        return threading.current_thread().name

    futures = [pool.submit(work) for _ in range(4)]
    deadline = time.monotonic() + 30
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(running) == 2  # the third and fourth wait for a thread
    release.set()
    names = {f.result(5) for f in futures}
    assert names <= {"t_0", "t_1"}
    assert all(t.daemon for t in threading.enumerate() if t.name in names)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(work)
