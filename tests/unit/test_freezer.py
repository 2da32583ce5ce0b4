"""Freezing a finished sandbox instead of waiting for its death (sandboxes/freezer.py).

Real processes in a real freezer cgroup of this machine's kernel (the broker runs as root and
so do these tests), standing in for a container: the cgroup's name plays the container id."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock_broker.sandboxes import exit_watch
from airlock_broker.sandboxes.exit_watch import FROZEN, ExitWatch
from airlock_broker.sandboxes.freezer import ArrivalWatch, Freezer, thaw_container
from tests.unit.fakes import run_at_engine

FREEZER = Path("/sys/fs/cgroup/freezer")

#: A stand-in worker: waits for "go", writes its report the way the worker does (a rename),
#: then lingers or exits, as argv says.
WORKER = """
import os, sys, time
out, then = sys.argv[1], sys.argv[2]
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.001)
with open(os.path.join(out, ".report.json.partial"), "w") as f:
    f.write("{}")
os.replace(os.path.join(out, ".report.json.partial"), os.path.join(out, "report.json"))
if then != "exit":
    open(os.path.join(out, ".d"), "w").close()
    os.replace(os.path.join(out, ".d"), os.path.join(out, "worker.done"))
if then == "linger":
    time.sleep(30)
elif then == "write-on":
    while True:  # what a payload left behind might do: keep changing the output
        with open(os.path.join(out, "model.onnx"), "a") as f:
            f.write("x")
"""


@pytest.fixture(autouse=True)
def patient_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker gives a freeze 0.1 s, then falls back to the death (tested below, with
    its own bound); a loaded machine can take longer to park a task, which is not what
    these tests are about."""
    monkeypatch.setattr(exit_watch, "FREEZE_TIMEOUT_SECONDS", 30.0)


@pytest.fixture
def cgroup() -> Iterator[Path]:
    assert (FREEZER / "freezer.state").exists() or FREEZER.is_dir(), \
        "this machine's cgroup v1 freezer hierarchy is missing"
    path = FREEZER / f"airlock-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            (path / "freezer.state").write_text("THAWED")
        deadline = time.monotonic() + 30
        while True:
            try:
                path.rmdir()
                break
            except OSError:  # tasks still leaving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def _reap(child: subprocess.Popen[bytes], cgroup: Path) -> None:
    """A test's child that is still alive: thawed (a frozen task ignores SIGKILL), killed."""
    if child.poll() is None:
        (cgroup / "freezer.state").write_text("THAWED")
        child.kill()
        child.wait()


def _start(cgroup: Path, out: Path, then: str) -> tuple[subprocess.Popen[bytes], ExitWatch]:
    child = subprocess.Popen([sys.executable, "-c", WORKER, str(out), then])
    (cgroup / "cgroup.procs").write_text(str(child.pid))
    cgroups = Path(f"/proc/{child.pid}/cgroup").read_text()
    watch = ExitWatch(os.pidfd_open(child.pid), child.pid, Freezer.of(cgroups, cgroup.name))
    assert watch.freezer is not None, cgroups
    return child, watch


async def _wait(child: subprocess.Popen[bytes], watch: ExitWatch, out: Path) -> object:
    # The child is reaped by its own thread (as a container's init is by its shim), which
    # outlives this loop when the child is left frozen.
    threading.Thread(target=child.wait, daemon=True).start()
    (out / "go").write_text("")
    return await asyncio.wait_for(watch.wait(out / "worker.done"), 60)


def _state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return "?"


def test_a_lingering_worker_is_frozen_after_its_report_then_killed(cgroup: Path,
                                                                     tmp_path: Path) -> None:
    child, watch = _start(cgroup, tmp_path, "linger")
    try:
        assert asyncio.run(_wait(child, watch, tmp_path)) == FROZEN
        assert (cgroup / "freezer.state").read_text().strip() == "FROZEN"
        assert child.poll() is None  # alive, and parked: it runs no instruction
    finally:
        watch.close()  # what destroy does: SIGKILL while frozen, then thaw
    assert child.wait(timeout=30) == -9
    assert (cgroup / "freezer.state").read_text().strip() == "THAWED"


def test_a_worker_that_exits_after_its_report_is_seen_dead_not_frozen(cgroup: Path,
                                                                        tmp_path: Path) -> None:
    child, watch = _start(cgroup, tmp_path, "exit")
    try:
        assert asyncio.run(_wait(child, watch, tmp_path)) == 0
    finally:
        watch.close()
    assert (cgroup / "freezer.state").read_text().strip() == "THAWED"


def test_nothing_changes_the_output_once_frozen(cgroup: Path, tmp_path: Path) -> None:
    child, watch = _start(cgroup, tmp_path, "write-on")
    try:
        assert asyncio.run(_wait(child, watch, tmp_path)) == FROZEN
        size = (tmp_path / "model.onnx").stat().st_size
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # an absence, over a window it writes thousands in
            assert (tmp_path / "model.onnx").stat().st_size == size
            time.sleep(0.01)
    finally:
        watch.close()
    child.wait(timeout=30)


def test_a_freeze_that_does_not_complete_falls_back_to_the_death(
        cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Freezer, "is_frozen", lambda self: False)  # as if a task never froze
    monkeypatch.setattr(exit_watch, "FREEZE_TIMEOUT_SECONDS", 0.05)
    child, watch = _start(cgroup, tmp_path, "exit")
    try:
        assert asyncio.run(_wait(child, watch, tmp_path)) == 0
    finally:
        watch.close()
    assert (cgroup / "freezer.state").read_text().strip() == "THAWED"


def test_an_orphan_frozen_by_a_dead_broker_is_killed_and_thawed(cgroup: Path,
                                                                 tmp_path: Path) -> None:
    child, watch = _start(cgroup, tmp_path, "linger")
    assert asyncio.run(_wait(child, watch, tmp_path)) == FROZEN
    watch.freezer = None  # the broker that froze it is gone
    watch.close()
    assert child.poll() is None
    thaw_container(child.pid, cgroup.name)
    assert child.wait(timeout=30) == -9


def test_the_freezer_is_found_only_on_a_path_naming_the_container(tmp_path: Path) -> None:
    (tmp_path / "freezer" / "docker" / "abc123").mkdir(parents=True)
    (tmp_path / "freezer" / "docker" / "abc123" / "freezer.state").write_text("THAWED\n")
    (tmp_path / "docker" / "abc123").mkdir(parents=True)
    (tmp_path / "docker" / "abc123" / "cgroup.freeze").write_text("0\n")
    v1 = "6:freezer:/docker/abc123\n4:memory:/docker/abc123\n"
    found = Freezer.of(v1, "abc123", tmp_path)
    assert found is not None and not found.v2
    assert Freezer.of(v1, "other", tmp_path) is None
    assert Freezer.of("6:freezer:/docker/../abc123\n", "abc123", tmp_path) is None
    found = Freezer.of("0::/docker/abc123\n", "abc123", tmp_path)
    assert found is not None and found.v2
    assert Freezer.of("6:freezer:/docker/abc123-gone\n", "abc123-gone", tmp_path) is None


def test_only_the_report_renamed_into_place_counts_as_its_arrival(tmp_path: Path) -> None:
    watch = ArrivalWatch.open(tmp_path, "report.json")
    assert watch is not None
    try:
        assert not watch.arrived()
        for i in range(100):  # a container renaming other files, as fast as it can
            (tmp_path / f"x{i}").write_text("")
            os.replace(tmp_path / f"x{i}", tmp_path / f"y{i}")
        # One small batch a look (test_a_container_renaming_without_end_costs_the_event_loop_
        # little): 100 events take a few looks, none of which sees the report.
        assert not any(watch.arrived() for _ in range(20))
        (tmp_path / "r.tmp").write_text("{}")
        os.replace(tmp_path / "r.tmp", tmp_path / "report.json")
        assert watch.arrived()
        for i in range(100):  # behind others, it is seen in a later look
            os.replace(tmp_path / f"y{i}", tmp_path / f"x{i}")
        os.replace(tmp_path / "report.json", tmp_path / "r.tmp")
        os.replace(tmp_path / "r.tmp", tmp_path / "report.json")
        assert not watch.arrived()
        assert any(watch.arrived() for _ in range(20))
    finally:
        watch.close()


# -- a freeze cut short: the kernel was asked, the broker stopped waiting ----------------------


def _until(what: str, check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {seconds} s"
        time.sleep(0.01)


def _freeze_state(cgroup: Path) -> str:
    return (cgroup / "freezer.state").read_text().strip()


def _still_freezing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``is_frozen`` as while the kernel is still freezing (a task in D state, thousands of
    tasks): always False, and how often it was asked."""
    asked: list[int] = []
    monkeypatch.setattr(Freezer, "is_frozen", lambda self: asked.append(1) or False)
    monkeypatch.setattr(exit_watch, "FREEZE_TIMEOUT_SECONDS", 600.0)  # not the test's exit
    return asked


async def _cancel_mid_freeze(watch: ExitWatch, out: Path, asked: list[int]) -> None:
    (out / "go").write_text("")
    waiting = asyncio.ensure_future(watch.wait(out / "worker.done"))
    deadline = asyncio.get_running_loop().time() + 60
    while not asked:  # the freeze is requested and being polled
        assert asyncio.get_running_loop().time() < deadline, "the freeze was never requested"
        assert not waiting.done(), waiting
        await asyncio.sleep(0.001)
    waiting.cancel()  # the job's deadline, or its client's cancel
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


def test_a_freeze_cut_short_by_a_cancellation_is_killed_and_thawed_on_close(
        cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the flag said "not frozen", ``close`` skipped the kill and thaw, the engine's
    SIGKILL could not end the parked tasks and the container lived until the next sweep."""
    child, watch = _start(cgroup, tmp_path, "linger")
    try:
        asked = _still_freezing(monkeypatch)
        asyncio.run(_cancel_mid_freeze(watch, tmp_path, asked))
        assert watch.freezer is not None and not watch.freezer.frozen
        watch.close()  # what DockerSandbox.destroy does first
        _until("thawed", lambda: _freeze_state(cgroup) == "THAWED")
        assert child.wait(timeout=60) == -9
    finally:
        watch.close()
        _reap(child, cgroup)


def test_the_deadline_kills_and_thaws_a_container_whose_freeze_it_cut_short(
        cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline fires while the freeze is polled: the container is killed and thawed
    before the engine's kill (which a frozen task ignores), not 30 s later at the removal."""
    from airlock_broker.sandboxes.sandbox import Slot
    from airlock_broker.sandboxes.workspace import JobWorkspace

    workspace = JobWorkspace(root=tmp_path / "slot", uid=os.getuid(), gid=os.getgid())
    workspace.in_dir.mkdir(parents=True)
    workspace.out_dir.mkdir()
    child, watch = _start(cgroup, workspace.out_dir, "linger")
    slot = Slot(slot_id="s", profile="light", container_id="c", started=True,
                workspace=workspace, exit_watch=watch)
    asked = _still_freezing(monkeypatch)
    api = _DeadAfterTheKillApi()
    # The report is there before the job starts, so the freeze begins at once.
    (workspace.out_dir / "go").write_text("")
    _until("reported", lambda: (workspace.out_dir / "worker.done").exists())
    api.cgroup = cgroup
    try:
        outcome = run_at_engine(api, slot, tmp_path, deadline_seconds=0.5)
        assert asked, "the freeze was never polled"
        assert outcome.timed_out
        assert api.state_at_kill == "THAWED"
        assert child.wait(timeout=60) == -9
    finally:
        watch.close()
        _reap(child, cgroup)


def test_an_orphan_left_freezing_is_killed_and_thawed_by_the_sweep(
        cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that died mid-freeze leaves its container FREEZING, not FROZEN: the sweep's
    forced removal kills and thaws it all the same (before: only a FROZEN one)."""
    child, watch = _start(cgroup, tmp_path, "linger")
    try:
        asyncio.run(_cancel_mid_freeze(watch, tmp_path, _still_freezing(monkeypatch)))
        watch.freezer = None  # the broker that asked for the freeze is gone
        watch.close()
        assert child.poll() is None
        thaw_container(child.pid, cgroup.name)  # still "freezing", as far as it can tell
        assert child.wait(timeout=60) == -9
        assert _freeze_state(cgroup) == "THAWED"
    finally:
        _reap(child, cgroup)


class _DeadAfterTheKillApi:
    """The engine's side of the deadline: records the freezer's state when the kill came."""

    cgroup: Path
    state_at_kill = ""

    def kill(self, container_id: str) -> None:
        self.state_at_kill = _freeze_state(self.cgroup)

    def wait(self, container_id: str, timeout: float | None = None) -> dict[str, int]:
        return {"StatusCode": 137}

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return {"State": {"Running": False, "ExitCode": 137, "OOMKilled": False}}


#: A payload in a finished sandbox that keeps renaming in its output directory, each rename an
#: event on the broker's arrival watch, as fast as it can and for as long as it may.
RENAMER = """
import os, sys
a, b = os.path.join(sys.argv[1], "a"), os.path.join(sys.argv[1], "b")
open(a, "w").close()
while True:
    os.rename(a, b)
    os.rename(b, a)
"""


def test_a_container_renaming_without_end_costs_the_event_loop_little(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenth review, of the validators: the arrival watch read every pending event on the
    event loop at each look, so a look cost what the container made since the last one:
    a quarter of the broker's event loop per renaming sandbox (half with two), every other
    caller's calls waiting behind it."""
    spent: list[float] = []
    arrived = ArrivalWatch.arrived

    def timed(self: ArrivalWatch) -> bool:
        start = time.perf_counter()
        try:
            return arrived(self)
        finally:
            spent.append(time.perf_counter() - start)

    monkeypatch.setattr(ArrivalWatch, "arrived", timed)
    child = subprocess.Popen([sys.executable, "-c", RENAMER, str(tmp_path)])
    # Never asked to freeze: the report never comes.
    watch = ExitWatch(os.pidfd_open(child.pid), child.pid, Freezer(tmp_path, v2=True))

    async def run() -> tuple[float, float]:
        waiting = asyncio.ensure_future(watch.wait(tmp_path / "worker.done"))
        start = time.perf_counter()
        late = 0.0
        while time.perf_counter() - start < 2.0:  # another caller's work, a tick a millisecond
            tick = time.perf_counter()
            await asyncio.sleep(0.001)
            late = max(late, time.perf_counter() - tick - 0.001)
        wall = time.perf_counter() - start
        child.kill()
        await asyncio.to_thread(child.wait)
        await asyncio.wait_for(waiting, 30)
        return wall, late

    try:
        wall, late = asyncio.run(run())
    finally:
        watch.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert spent, "the renames were never looked at"
    share = sum(spent) / wall
    assert share < 0.08, (f"the arrival watch took {share:.0%} of the event loop "
                          f"({len(spent)} looks, the longest {max(spent) * 1000:.1f} ms; "
                          f"a tick came {late * 1000:.1f} ms late)")
