"""The validator template's loop: fork one single-use validator per ``spawn``, reap them.

Runs in the template process (``onnx_worker.main``), after onnx is imported and the process is
confined. Forking a process that has onnx imported costs milliseconds where starting one costs
an interpreter and ``import onnx`` (~0.6 s), so one validation per process keeps its latency.

Protocol on the control socket (SOCK_SEQPACKET, one message each): the template sends
``ready``; the broker sends ``spawn``; the template answers with ``{"pid": N}`` carrying four
descriptors (SCM_RIGHTS): the validator's job socket, the read end of its stderr pipe, the read
end of its status pipe (the template writes the validator's exit status there, a little-endian
int32 as ``Popen.returncode`` has it, when it reaps it) and a pidfd (so that the broker can kill
it without racing pid reuse). EOF on the control socket ends the template and its validators.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from airlock_broker.validation.confinement import drop_privileges, enter_empty_root

#: Said by the template on its control socket and by each validator on its job socket.
READY = b"ready"
SPAWN = b"spawn"
#: Descriptors that come with a spawned validator, in this order.
SPAWN_FDS = ("job", "stderr", "status", "pidfd")
STATUS = struct.Struct("<i")
#: Exit code of a validator whose own set-up or protocol failed (its stderr says why).
SETUP_FAILED = 70
#: Validators alive at once beyond which the template refuses to fork (a broker bug).
MAX_CHILDREN = 256
#: Where a validator finds its job socket (stdin, stdout and stderr are below it).
JOB_FD = 3
_PR_SET_PDEATHSIG = 1


def vm_size_bytes() -> int:
    """This process's address space now (read while /proc is still visible)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies; exit now if it is already gone.

    Set after any uid change (the kernel clears PDEATHSIG when credentials change). The
    broker starts the template from the event loop's thread, which lives as long as the broker
    (PDEATHSIG follows the thread that forked us, not the process)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before we asked
        os._exit(0)


@dataclass
class _Child:
    pid: int
    status_w: int


class Template:
    """The template process's state: its control socket and the validators it forked."""

    def __init__(self, control_fd: int, settings: dict[str, Any], parent: int,
                 isolated: bool) -> None:
        self.control = socket.socket(fileno=control_fd)
        self.settings = settings
        self.parent = parent
        self.isolated = isolated
        self.children: dict[int, _Child] = {}  # by pidfd
        self.base_vm_bytes = 0

    def run(self, child: Callable[[Connection, int], None]) -> None:
        """Finish confining, say ready, serve ``spawn`` until EOF; kill what is left."""
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        self.base_vm_bytes = vm_size_bytes()  # before /proc disappears with the old root
        if self.isolated:
            enter_empty_root()
        drop_privileges(self.isolated, self.isolated, int(self.settings["uid"]),
                        int(self.settings["gid"]))
        die_with_parent(self.parent)
        gc.collect()
        gc.freeze()  # children's collections then do not touch (and copy) the template's pages
        self.control.send(READY)
        try:
            while True:
                watched: list[int] = [self.control.fileno(), *self.children]
                readable, _, _ = select.select(watched, [], [])
                for item in readable:
                    if item == self.control.fileno():
                        message = self.control.recv(64)
                        if not message:
                            return
                        if message != SPAWN:
                            raise ValueError("the template got an unknown message")
                        self._spawn(child)
                    else:
                        self._reap(item)
        finally:
            for pidfd in list(self.children):
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def _spawn(self, child: Callable[[Connection, int], None]) -> None:
        if len(self.children) >= MAX_CHILDREN:
            raise ValueError("too many validators alive at once")
        job_ours, job_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the validator
            code = SETUP_FAILED
            try:
                os.dup2(err_w, 2)
                os.dup2(job_theirs.fileno(), JOB_FD)
                os.closerange(JOB_FD + 1, 1 << 16)  # the template's sockets, others' pipes
                die_with_parent(os.getppid())
                child(Connection(JOB_FD), self.base_vm_bytes)
                code = 0
            except BaseException:  # reported on stderr, which the broker reads
                with contextlib.suppress(BaseException):
                    traceback.print_exc(limit=8, file=sys.stderr)
                    sys.stderr.flush()
            finally:
                os._exit(code)
        pidfd = os.pidfd_open(pid)
        try:
            os.close(err_w)  # status_w stays: the template writes the exit status there
            job_theirs.close()
            socket.send_fds(self.control, [json.dumps({"pid": pid}).encode()],
                            [job_ours.fileno(), err_r, status_r, pidfd])
        finally:
            job_ours.close()
            os.close(err_r)
            os.close(status_r)
        self.children[pidfd] = _Child(pid, status_w)

    def _reap(self, pidfd: int) -> None:
        entry = self.children.pop(pidfd)
        _pid, status = os.waitpid(entry.pid, 0)
        with contextlib.suppress(OSError):
            os.write(entry.status_w, STATUS.pack(os.waitstatus_to_exitcode(status)))
        os.close(entry.status_w)
        os.close(pidfd)
