"""A warm worker sleeps on its doorbell (contract.DOORBELL_NAME) instead of looking for its job
spec 200 times a second, and the broker rings it once the spec is in place: the broker's half
(``JobWorkspace.make_doorbell``, ``write_job_spec``) against the worker's (``wait_for_spec``),
each on its own thread. Counted in wake-ups, not timed."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airlock_broker.sandboxes.workspace import JobWorkspace
from airlock_sandbox.contract import DOORBELL_NAME, JobSpec
from airlock_worker import __main__ as worker_main

DEADLINE = 60.0


@pytest.fixture
def workspace(tmp_path: Path) -> JobWorkspace:
    ws = JobWorkspace(root=tmp_path, uid=os.getuid(), gid=os.getgid())
    ws.in_dir.mkdir(mode=0o755)
    return ws


class Counted:
    """``wait_for_spec``'s sleeps and its waits at the bell (``at_bell``: it came to one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sleeps = 0
        self.rings: list[bool] = []
        rang = worker_main._rang

        def counted_rang(bell: int, seconds: float) -> bool:
            self.at_bell.set()  # a byte written from here on is in the pipe when it polls
            self.rings.append(rang(bell, seconds))
            return self.rings[-1]

        def counted_sleep(seconds: float) -> None:
            self.sleeps += 1
            waited.wait(seconds)

        waited = threading.Event()
        self.at_bell = threading.Event()
        monkeypatch.setattr(worker_main, "_rang", counted_rang)
        monkeypatch.setattr(time, "sleep", counted_sleep)  # the worker's


class Waiting(list[object]):
    """What ``wait_for_spec`` returned (or raised), on the worker's thread."""

    thread: threading.Thread


def _until(condition: Callable[[], bool], got: Waiting) -> None:
    """Poll ``condition`` while the worker's thread waits (``time.sleep`` is the test's)."""
    pause, deadline = threading.Event(), time.monotonic() + DEADLINE
    while not condition():
        assert got.thread.is_alive(), got
        assert time.monotonic() < deadline, "the condition was never met"
        pause.wait(0.01)


@contextlib.contextmanager
def _waiting(ws: JobWorkspace) -> Iterator[Waiting]:
    """A worker waiting for its spec in ``ws`` on a thread, joined when the block ends."""
    got = Waiting()

    def wait() -> None:
        try:
            got.append(worker_main.wait_for_spec(str(ws.in_dir), DEADLINE))
        except BaseException as exc:
            got.append(exc)

    got.thread = threading.Thread(target=wait)
    got.thread.start()
    try:
        yield got
    finally:
        got.thread.join(DEADLINE)


@contextlib.contextmanager
def _at_its_bell(ws: JobWorkspace, counted: Counted) -> Iterator[Waiting]:
    """The same, with a doorbell, once the worker waits at it."""
    ws.make_doorbell()
    with _waiting(ws) as got:
        _until(counted.at_bell.is_set, got)
        yield got


def test_the_bell_is_a_fifo_the_sandbox_may_only_read(workspace: JobWorkspace) -> None:
    old = os.umask(0o077)  # the broker's umask does not decide its mode
    try:
        workspace.make_doorbell()
    finally:
        os.umask(old)
    st = os.lstat(workspace.in_dir / DOORBELL_NAME)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_uid == os.geteuid()


def test_a_waiting_worker_sleeps_on_its_bell_until_the_spec_is_in_place(
        workspace: JobWorkspace, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counted(monkeypatch)
    with _at_its_bell(workspace, counted) as got:
        workspace.write_job_spec(JobSpec(job_id="rung"))
    assert [type(g).__name__ for g in got] == ["JobSpec"] and got[0].job_id == "rung"  # type: ignore[attr-defined]
    assert counted.sleeps == 0  # never polled
    assert counted.rings[-1] is True and counted.rings.count(True) == 1, counted.rings


def test_a_spec_written_before_the_worker_looks_is_found_at_once(
        workspace: JobWorkspace, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counted(monkeypatch)
    workspace.make_doorbell()
    workspace.write_job_spec(JobSpec(job_id="early"))  # nobody listens: the ring is dropped
    assert worker_main.wait_for_spec(str(workspace.in_dir), DEADLINE).job_id == "early"
    assert counted.sleeps == 0 and counted.rings == []


def test_without_a_bell_the_worker_polls(workspace: JobWorkspace,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counted(monkeypatch)
    with _waiting(workspace) as got:
        _until(lambda: counted.sleeps >= 3, got)
        workspace.write_job_spec(JobSpec(job_id="polled"))  # no bell: the ring is a no-op
    assert got[0].job_id == "polled"  # type: ignore[attr-defined]
    assert counted.rings == []


@pytest.mark.parametrize("bell", ["a file", "a link to a fifo"])
def test_a_bell_that_is_not_a_fifo_of_its_own_is_not_used(
        workspace: JobWorkspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        bell: str) -> None:
    path = workspace.in_dir / DOORBELL_NAME
    if bell == "a file":
        path.write_bytes(b"")
    else:
        os.mkfifo(tmp_path / "elsewhere")
        path.symlink_to(tmp_path / "elsewhere")
    assert worker_main._open_doorbell(str(workspace.in_dir)) is None
    if bell == "a file":
        workspace._ring()  # the broker writes nothing into it ...
        assert path.read_bytes() == b""
        return
    reader = os.open(tmp_path / "elsewhere", os.O_RDONLY | os.O_NONBLOCK)
    try:
        workspace._ring()  # ... nor through the link
        with contextlib.suppress(BlockingIOError):
            assert os.read(reader, 16) == b""
    finally:
        os.close(reader)


def test_a_bell_that_rang_without_a_spec_leaves_the_worker_polling_not_spinning(
        workspace: JobWorkspace, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counted(monkeypatch)
    with _at_its_bell(workspace, counted) as got:
        os.close(os.open(workspace.in_dir / DOORBELL_NAME, os.O_WRONLY | os.O_NONBLOCK))
        _until(lambda: counted.sleeps >= 3, got)  # back to looking at the polling interval
        workspace.write_job_spec(JobSpec(job_id="late"))  # its ring finds no reader now
    assert got[0].job_id == "late"  # type: ignore[attr-defined]
    assert counted.rings.count(True) == 1


def test_the_broker_never_waits_at_a_bell_nobody_listens_to(workspace: JobWorkspace) -> None:
    workspace._ring()  # no bell
    workspace.make_doorbell()
    workspace._ring()  # a bell, no reader: ENXIO, not a wait
    reader = os.open(workspace.in_dir / DOORBELL_NAME, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for _ in range(70_000):  # more bytes than a pipe holds: never blocks
            workspace._ring()
        assert os.read(reader, 16) == b"\n" * 16
    finally:
        os.close(reader)


def test_a_worker_that_stops_listening_between_the_open_and_the_byte_is_no_error(
        workspace: JobWorkspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm worker closes its bell when its once-a-second look finds the spec; if that
    falls between the broker's open of the bell and its write, the write gets EPIPE. It was
    raised out of ``write_job_spec``, and the job ended INTERNAL with a traceback."""
    from airlock_broker.sandboxes import workspace as workspace_module

    workspace.make_doorbell()
    reader = [os.open(workspace.in_dir / DOORBELL_NAME, os.O_RDONLY | os.O_NONBLOCK)]
    real_fstat = os.fstat

    def fstat_as_the_worker_leaves(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        if reader:  # the broker has its end open: the worker closes its own now
            os.close(reader.pop())
        return result

    monkeypatch.setattr(workspace_module.os, "fstat", fstat_as_the_worker_leaves)
    workspace._ring()
    assert reader == []  # the race happened as described, and the ring took it
