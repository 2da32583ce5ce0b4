"""Stop a finished runc sandbox in place, so that its output can be read before it has died.

A worker's last act, process exit, is its slowest: the kernel frees an address space that
imported scikit-learn, onnxruntime or torch (240 MiB resident and more) before the container's
init counts as dead. Measured on this machine: 15-50 ms for the sklearn profile, more for
torch, on every job's path. What the broker's verdict needs is not the death itself but its
consequence: nothing in the container can change the output any more (DESIGN §1.4). A frozen
cgroup gives exactly that, at once:

* The worker writes its report last, then waits (``JobSpec.linger_seconds``) instead of
  exiting. The broker sees the report appear (inotify on the output directory, which is the
  broker's own tmpfs), freezes the container's cgroup and waits until the kernel says
  ``FROZEN``: every task of the container is then parked in the freezer, runs no instruction,
  and can neither fork nor leave the cgroup (the sandbox cannot write cgroupfs). From then on
  the output is as still as a dead container's.
* The container stays frozen until the broker destroys it (after the answer): every task gets
  a SIGKILL while frozen, so that when it is thawed it dies before it could run again, and
  only then is it thawed and removed. The teardown's CPU is spent after the answer, not
  before it.
* Anything unexpected (no freezer hierarchy, a freeze that does not complete within
  ``FREEZE_TIMEOUT_SECONDS``, an exit first) falls back to waiting for the death, as before:
  the worker exits by itself at the end of its linger.

Only for runc with the kernel exit watch (``exit_watch.py``): the cgroup must be proven to be
the container's, which the watch does on a pidfd of the live init.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import struct
from pathlib import Path

from airlock_broker.sandboxes.cgroup_paths import CGROUP_ROOT, container_cgroups, write_control

#: How long a freeze may take before the broker thaws and waits for the death instead.
FREEZE_TIMEOUT_SECONDS = 0.1
#: How long a worker whose broker can freeze it waits after its report before it exits anyway.
LINGER_SECONDS = 5.0


class Freezer:
    """One container's freezer cgroup (v1 ``freezer.state`` or v2 ``cgroup.freeze``)."""

    def __init__(self, directory: Path, v2: bool) -> None:
        self.directory = directory
        self.v2 = v2
        #: True from a completed freeze until ``kill_and_thaw``.
        self.frozen = False
        #: True from the moment a freeze is asked of the kernel until a thaw: a freeze cut
        #: short (the job's deadline or its client's cancel while the kernel was still
        #: freezing) leaves the cgroup FREEZING with ``frozen`` False, and a frozen task does
        #: not die of the engine's SIGKILL (cgroup v1), so the teardown must go by this.
        self.requested = False

    @classmethod
    def of(cls, cgroups: str, container_id: str,
           root: Path = CGROUP_ROOT) -> Freezer | None:
        """The freezer of the process whose ``/proc/PID/cgroup`` is ``cgroups``, if its path
        names ``container_id`` and the control files exist; else None."""
        for controllers, path in container_cgroups(cgroups, container_id):
            if "freezer" in controllers.split(","):
                directory = root / "freezer" / path
                if (directory / "freezer.state").is_file():
                    return cls(directory, v2=False)
            elif controllers == "":
                directory = root / path
                if (directory / "cgroup.freeze").is_file():
                    return cls(directory, v2=True)
        return None

    def request(self) -> None:
        """Ask the kernel to freeze every task (``is_frozen`` says when it is done)."""
        self.requested = True  # before the write: a failed write leaves a thaw to do, no harm
        self._write(b"1" if self.v2 else b"FROZEN")

    def is_frozen(self) -> bool:
        if self.v2:
            return b"frozen 1" in (self.directory / "cgroup.events").read_bytes()
        return (self.directory / "freezer.state").read_bytes().strip() == b"FROZEN"

    def kill_and_thaw(self) -> None:
        """SIGKILL every task while frozen (they die as soon as they are thawed, before they
        run again), then thaw. Idempotent; errors are left to the engine's forced removal."""
        with contextlib.suppress(OSError):
            for line in (self.directory / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(line), signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.thaw()
        self.frozen = False

    def thaw(self) -> None:
        self._write(b"0" if self.v2 else b"THAWED")
        self.requested = False

    def _write(self, value: bytes) -> None:
        write_control(self.directory / ("cgroup.freeze" if self.v2 else "freezer.state"), value)


def thaw_container(pid: int, container_id: str) -> None:
    """Kill and thaw a running container this or an earlier broker may have frozen (an
    orphan), so that the engine can remove it. Whatever its freezer says: a freeze cut short
    leaves it FREEZING, neither frozen nor thawed, and the container is being removed anyway.
    Does nothing when its process or freezer cannot be found."""
    if pid <= 0:
        return
    with contextlib.suppress(OSError):
        freezer = Freezer.of(Path(f"/proc/{pid}/cgroup").read_text(), container_id)
        if freezer is not None:
            freezer.kill_and_thaw()


# -- the report's arrival: inotify on the output directory ------------------------------------

_IN_MOVED_TO = 0x00000080
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
#: What one look reads of the events: room for one with the longest name (16 + 256 bytes; a
#: smaller buffer is EINVAL), or sixteen with short ones. About 25 us a look.
_ARRIVAL_READ_BYTES = 512


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library's handle, looked up once (every job opens a watch)."""
    return ctypes.CDLL(None, use_errno=True)


class ArrivalWatch:
    """An inotify descriptor on one directory, for one name being renamed into it."""

    def __init__(self, fd: int, name: bytes) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def open(cls, directory: Path, name: str) -> ArrivalWatch | None:
        """None when inotify is unavailable (the caller then waits for the death)."""
        try:
            libc = _libc()
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MOVED_TO) < 0:
            os.close(fd)
            return None
        return cls(fd, os.fsencode(name))

    def arrived(self) -> bool:
        """Read one bounded batch of the pending events; whether one was ``name`` moved into
        the directory (an overflowed queue counts as a maybe: the caller checks the file
        itself, and it does so whatever this says, so an event left unread costs nothing).

        One batch, never "until the queue is empty": the container makes these events, as
        fast as it likes (a rename loop makes ~360,000 a second), and they are read on the
        event loop. Draining them all cost the loop time in proportion to what the container
        made meanwhile (a quarter of the loop for each renaming sandbox), however rarely it
        looked; one small batch costs tens of microseconds, and the rest of a flood stays in
        the kernel's bounded queue (``max_queued_events``), then overflows."""
        try:
            data = os.read(self.fd, _ARRIVAL_READ_BYTES)
        except BlockingIOError:
            return False
        except OSError:
            return True
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size: offset + _EVENT.size + length]
            offset += _EVENT.size + length
            if mask & 0x4000 or raw.rstrip(b"\0") == self.name:  # IN_Q_OVERFLOW
                return True
        return False

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
