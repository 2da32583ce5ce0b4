"""Notice a runc sandbox's death from the kernel instead of waiting for the engine to report it.

Docker reports a container dead 40-60 ms after its last process is gone: the shim reaps the
init process, tells containerd, containerd tells dockerd, dockerd cleans up, writes its state
and only then answers ``wait``. For a 10 ms conversion that is most of the latency. The kernel
knows sooner, and it knows what the broker's verdict needs:

* **Dead means dead.** A container's first process is the init of the container's own PID
  namespace (Airlock never sets ``pid_mode``). When it exits, the kernel SIGKILLs every other
  process of the namespace and reaps them *before* the init is marked exited, so once a pidfd
  on the init polls readable, nothing of the container runs any more and nothing can write to
  its output mount (DESIGN §1.4: output is read only after the container is dead).
* **The exit status, after the shim has reaped it.** Since Linux 6.15, ``PIDFD_GET_INFO`` with
  ``PIDFD_INFO_EXIT`` gives a reaped process's wait status to anyone holding a pidfd opened
  while it lived. No container output is trusted: this is the same status the engine reports.

Only a clean ``exit(0)`` is taken from here. Anything else (a signal, OOM, a non-zero code) is
left to the engine's slower, fuller answer (``OOMKilled``, who sent a kill), so a failure's
reason never depends on which path noticed it. gVisor is not watched: its ``State.Pid`` is the
sandbox kernel's process, not the worker.

A pidfd is opened on a PID the engine reported, and PIDs are reused, so :meth:`ExitWatch.open`
proves the descriptor is the container's: the process must be in a cgroup naming the
container, checked while the pidfd still shows it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import struct
import subprocess
import sys
from functools import cache
from pathlib import Path

from airlock_broker.sandboxes.freezer import FREEZE_TIMEOUT_SECONDS, ArrivalWatch, Freezer

#: ``_IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info)`` for the 64-byte first version of the
#: struct (linux/pidfd.h): the kernel takes the size from the request number.
_PIDFD_INFO_SIZE = 64
PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
PIDFD_INFO_EXIT = 1 << 3
#: Offset of ``__s32 exit_code`` in ``struct pidfd_info``: mask, cgroupid, then eleven u32.
_EXIT_CODE_OFFSET = 60

#: The shim reaps the init within a millisecond or two of its exit, but on a loaded machine it
#: can take hundreds. The engine cannot know before the shim has reaped, so waiting here costs
#: nothing; past this the shim is stuck and the engine's answer (or the deadline) decides.
REAP_WAIT_SECONDS = 2.0
_REAP_POLL_SECONDS = 0.001
#: ``ExitWatch.wait``'s answer for a container frozen after its report (freezer.py).
FROZEN = "frozen"
_FREEZE_POLL_SECONDS = 0.0002
#: At most one look at the output directory per this long, however many renames a container
#: makes there.
_ARRIVAL_MIN_INTERVAL = 0.002


def exit_status(pidfd: int) -> int | None:
    """The wait status of the reaped process behind ``pidfd``, or None while it is not reaped
    (or on a kernel without ``PIDFD_INFO_EXIT``)."""
    buf = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except OSError:
        return None
    (mask,) = struct.unpack_from("=Q", buf, 0)
    if not mask & PIDFD_INFO_EXIT:
        return None
    (status,) = struct.unpack_from("=i", buf, _EXIT_CODE_OFFSET)
    return int(status)


@cache
def supported() -> bool:
    """Whether this kernel gives a reaped process's exit status through its pidfd (probed once,
    on a child that exits with 7)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return False
    try:
        child = subprocess.Popen(["/bin/sh", "-c", "exit 7"], close_fds=True)
    except OSError:
        return False
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:
        child.wait()
        return False
    try:
        child.wait()
        status = exit_status(pidfd)
        return status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    finally:
        os.close(pidfd)


def describe(setting: str, runtime_family: str) -> str:
    """How this broker will learn of sandbox deaths, and why, for its start-up log line."""
    if setting == "engine":
        return "exits seen by the engine (exit_watch = \"engine\")"
    if runtime_family != "runc":
        return f"exits seen by the engine ({runtime_family} has no watchable init)"
    if not supported():
        return "exits seen by the engine (this kernel has no PIDFD_INFO_EXIT, Linux < 6.15)"
    if setting == "freeze":
        return ("finished sandboxes frozen, not awaited, where the container's freezer cgroup "
                "is writable; other clean exits seen by the kernel (pidfd)")
    return "clean exits seen by the kernel (pidfd)"


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _alive(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return not readable


class ExitWatch:
    """A pidfd on one container's init process. Owned by its slot; closed when it is destroyed."""

    def __init__(self, pidfd: int, pid: int, freezer: Freezer | None = None,
                 cgroups: str = "") -> None:
        self._fd = pidfd
        self.pid = pid
        #: The container's freezer cgroup, found while the init provably lived; None: the
        #: broker waits for the death (freezer.py).
        self.freezer = freezer
        #: The init's ``/proc/PID/cgroup``, read while it provably lived: where the
        #: container's other controls are (cpu_weight.py).
        self.cgroups = cgroups

    @classmethod
    def open(cls, pid: int, container_id: str, *, freeze: bool = False) -> ExitWatch | None:
        """A watch on ``pid`` if it is, provably, the live init of ``container_id``; else None
        (the caller then waits for the engine, as without a watch). ``freeze``: with the
        container's freezer cgroup, when there is one."""
        if pid <= 0 or not supported():
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as f:
                cgroups = f.read(64 * 1024)
            # Read while the pidfd's process lived, so the file was that process's.
            if container_id in cgroups and _alive(pidfd):
                freezer = Freezer.of(cgroups, container_id) if freeze else None
                watch, pidfd = cls(pidfd, pid, freezer, cgroups), -1
                return watch
            return None
        except OSError:
            return None
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def exited(self) -> bool:
        return self._fd < 0 or not _alive(self._fd)

    async def wait(self, report: Path | None = None) -> int | str | None:
        """Wait until every process of the container is gone, or, given the path by which the
        worker says it succeeded (``contract.DONE_NAME``) and a freezer, until that path is
        there and the container frozen.

        Returns ``FROZEN`` for the latter; else the init's exit code if it exited normally and
        was reaped in time, None if the engine must say how it ended."""
        if self._fd < 0:
            raise ValueError("closed exit watch")
        loop = asyncio.get_running_loop()
        dead: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not dead.done():
                dead.set_result(None)

        loop.add_reader(self._fd, readable)
        arrival = None
        if report is not None and self.freezer is not None:
            arrival = ArrivalWatch.open(report.parent, report.name)
        try:
            if report is not None and arrival is not None and \
                    await self._freeze_after(report, arrival, dead):
                return FROZEN
            await dead
        finally:
            loop.remove_reader(self._fd)
            if arrival is not None:
                arrival.close()
        deadline = loop.time() + REAP_WAIT_SECONDS
        while (status := exit_status(self._fd)) is None and loop.time() < deadline:
            await asyncio.sleep(_REAP_POLL_SECONDS)
        if status is None or not os.WIFEXITED(status):
            return None
        return os.WEXITSTATUS(status)

    async def _freeze_after(self, report: Path, arrival: ArrivalWatch,
                            dead: asyncio.Future[None]) -> bool:
        """Wait for ``report`` to be renamed into place, then freeze; False if the container
        died first or the freeze failed (the caller then waits for the death)."""
        loop = asyncio.get_running_loop()
        while not dead.done():
            if not os.path.lexists(report):  # it may have come before the watch
                moved: asyncio.Future[None] = loop.create_future()
                loop.add_reader(arrival.fd, _settle, moved)
                try:
                    await asyncio.wait({dead, moved}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_reader(arrival.fd)
                if dead.done():
                    return False
                if not arrival.arrived() or not os.path.lexists(report):
                    await asyncio.sleep(_ARRIVAL_MIN_INTERVAL)
                    continue
            return await self._freeze()
        return False

    async def _freeze(self) -> bool:
        freezer = self.freezer
        assert freezer is not None
        loop = asyncio.get_running_loop()
        try:
            freezer.request()
            deadline = loop.time() + FREEZE_TIMEOUT_SECONDS
            while not freezer.is_frozen():
                if loop.time() >= deadline:
                    freezer.thaw()
                    return False
                await asyncio.sleep(_FREEZE_POLL_SECONDS)
        except OSError:
            with contextlib.suppress(OSError):
                freezer.thaw()
            return False
        if not _alive(self._fd):
            # It exited on its way (a worker that does not linger): its own status says how.
            freezer.thaw()
            return False
        freezer.frozen = True
        return True

    def kill_and_thaw(self) -> None:
        """Kill and thaw the container if a freeze was ever asked of it and not undone, whether
        or not the kernel finished it: a task parked in the freezer dies of no SIGKILL (the
        engine's kill at the deadline, its forced removal) until it is thawed. Idempotent."""
        if self.freezer is not None and (self.freezer.requested or self.freezer.frozen):
            self.freezer.kill_and_thaw()

    def close(self) -> None:
        """Kill and thaw a frozen or freezing container (so that the engine can remove it) and
        close."""
        self.kill_and_thaw()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
