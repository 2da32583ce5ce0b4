"""The kernel-side exit watch: exit statuses through a pidfd, and refusal of a PID it cannot
prove is the container's. Real processes, no container (the integration tests have those)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from airlock_broker.sandboxes import exit_watch
from airlock_broker.sandboxes.exit_watch import ExitWatch
from airlock_sandbox.policy import SandboxPolicy


def _watched(script: str) -> tuple[subprocess.Popen[bytes], ExitWatch]:
    child = subprocess.Popen([sys.executable, "-c", script])
    return child, ExitWatch(os.pidfd_open(child.pid), child.pid)


async def _wait_reaping(child: subprocess.Popen[bytes], watch: ExitWatch) -> int | None:
    """Reap the child in a thread, as the container's shim does, while the watch waits."""
    reaper = asyncio.get_running_loop().run_in_executor(None, child.wait)
    try:
        return await watch.wait()
    finally:
        await reaper
        watch.close()


def test_this_kernel_gives_exit_statuses_through_pidfds() -> None:
    # The machine the project runs on has Linux 6.18; if this fails, the broker silently
    # falls back to the engine's wait and S1/S2 lose ~40 ms each.
    assert exit_watch.supported()


@pytest.mark.parametrize(("script", "expected"), [
    ("raise SystemExit(0)", 0),
    ("raise SystemExit(3)", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None),
])
def test_wait_returns_the_exit_code_or_none_for_a_signal(script: str,
                                                         expected: int | None) -> None:
    child, watch = _watched(script)
    assert asyncio.run(_wait_reaping(child, watch)) == expected


def test_an_unreaped_process_is_left_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exit_watch, "REAP_WAIT_SECONDS", 0.05)
    child, watch = _watched("raise SystemExit(0)")
    try:
        # Nobody reaps it within the watch's patience: it is a zombie, its status unknown.
        assert asyncio.run(watch.wait()) is None
    finally:
        child.wait()
        watch.close()


def test_a_live_process_is_running_and_a_dead_one_is_not() -> None:
    child, watch = _watched("import sys; sys.stdin.read()")
    try:
        assert not watch.exited()
        child.kill()
        child.wait()
        assert watch.exited()
    finally:
        watch.close()
    assert watch.exited()  # closed: never mistaken for alive


def test_open_refuses_a_pid_outside_the_container() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        # Our own children are in no container's cgroup: a reused PID is refused this way.
        assert ExitWatch.open(child.pid, "0123456789abcdef" * 4) is None
        assert ExitWatch.open(0, "anything") is None
    finally:
        child.kill()
        child.wait()


def test_open_refuses_a_dead_pid() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert ExitWatch.open(child.pid, "") is None


def test_the_policy_refuses_an_unknown_exit_watch() -> None:
    assert SandboxPolicy().exit_watch == "freeze"
    assert SandboxPolicy(exit_watch="pidfd").exit_watch == "pidfd"
    assert SandboxPolicy(exit_watch="engine").exit_watch == "engine"
    with pytest.raises(ValueError, match="exit_watch"):
        SandboxPolicy(exit_watch="poll")


def test_the_start_up_line_says_which_path_and_why() -> None:
    assert exit_watch.describe("pidfd", "runc") == "clean exits seen by the kernel (pidfd)"
    assert "runsc" in exit_watch.describe("pidfd", "runsc")
    assert "engine" in exit_watch.describe("engine", "runc")
    assert exit_watch.describe("freeze", "runc").startswith("finished sandboxes frozen")
    assert "runsc" in exit_watch.describe("freeze", "runsc")
