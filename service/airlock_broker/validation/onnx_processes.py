"""The broker's handles on the ONNX validator processes: the template and each validator.

``onnx_pool`` owns them; see ``onnx_template`` for the template's side of the protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from airlock_broker.errors import Reason, error
from airlock_broker.validation.onnx_template import READY, SPAWN, SPAWN_FDS, STATUS
from airlock_broker.validation.stderr_pipe import StderrDrain


class Validator:
    """One forked, single-use validator: its job socket, stderr, exit status and pidfd."""

    def __init__(self, pid: int, fds: dict[str, int], stderr_bytes: int) -> None:
        self.pid = pid
        self.conn = Connection(fds["job"])
        self._status = fds["status"]
        self._pidfd = fds["pidfd"]
        self.stderr = StderrDrain(fds["stderr"], stderr_bytes, f"ONNX validator {pid}")
        self._code: int | None = None
        self._closing = threading.Lock()
        self._closed = False
        #: Set once it was told to die (it may still be alive for a moment).
        self.killed = False

    def kill(self) -> None:
        """SIGKILL through the pidfd (no pid-reuse race); safe from any thread, and again."""
        self.killed = True
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the template to report the exit status."""
        if self._code is not None or self._closed:
            return
        with contextlib.suppress(OSError, ValueError):
            if _readable(self._status, timeout):
                data = os.read(self._status, STATUS.size)
                if len(data) == STATUS.size:
                    (self._code,) = STATUS.unpack(data)

    @property
    def exitcode(self) -> int | None:
        return self._code

    def reap(self) -> None:
        """Kill it, wait for its status and stderr, release every descriptor. Idempotent."""
        self.kill()
        self.join(5.0)
        with self._closing:
            if self._closed:
                return
            self._closed = True
            for close in (self.conn.close, lambda: os.close(self._status),
                          lambda: os.close(self._pidfd)):
                with contextlib.suppress(OSError):
                    close()
        self.stderr.join(1.0)


class Template:
    """The template process and the broker's end of its control socket."""

    def __init__(self, module: str, config: str, stderr_bytes: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = os.pipe()
        try:
            # Its own argv and a minimal environment; no multiprocessing machinery (no
            # re-import of the broker's __main__, no resource tracker); the broker's import path
            # made absolute, since it runs in "/" ("" was the broker's cwd); BLAS without a
            # thread pool (the template forks). It dies with the broker (PDEATHSIG) and on EOF
            # of the socket.
            self.process = subprocess.Popen(
                [sys.executable, "-B", "-m", module, str(theirs.fileno()), config],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_w,
                pass_fds=(theirs.fileno(),),
                env={"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path),
                     "PATH": os.defpath, "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                     "OMP_NUM_THREADS": "1"},
                cwd="/", start_new_session=True)
        except BaseException:
            ours.close()
            os.close(err_r)
            raise
        finally:
            theirs.close()  # so that a dead template reads as EOF instead of a silent wait
            os.close(err_w)
        self.control = ours
        self.stderr = StderrDrain(err_r, stderr_bytes, f"ONNX validator template {self.pid}")
        self.ready = False
        self.lock = threading.Lock()
        #: Orders "said ready" against ``kill_if_starting``: killed first, it never counts as
        #: ready (so never forks); ready first, it is not killed there.
        self._ready_lock = threading.Lock()
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """False from the moment it is killed: SIGKILL is not instant, and a template still
        dying must not be asked to fork (its control pipe breaks under the request)."""
        return not self.killed and self.process.poll() is None

    def await_ready(self, timeout: float) -> None:
        """Block until the template said ready; ``INTERNAL`` if it does not in ``timeout``."""
        if self.ready:
            return
        with contextlib.suppress(OSError):
            if _readable(self.control.fileno(), timeout) and \
                    self.control.recv(16) == READY:
                with self._ready_lock:
                    if not self.killed:
                        self.ready = True
                        return
        self.kill()
        raise error(Reason.INTERNAL,
                    f"the ONNX validator template did not start within {timeout:g} s "
                    f"(exit code {self.process.poll()}; its stderr is in the broker's log)")

    def kill_if_starting(self) -> None:
        """Kill it if it has not said ready: it has forked no validator (whose exit status only
        it could report), and whoever waits for it to start stops waiting at once."""
        with self._ready_lock:
            if not self.ready:
                self.kill()

    def spawn(self, timeout: float, stderr_bytes: int) -> Validator:
        """Ask for one fresh validator; ``OSError`` if the template does not give one."""
        self.control.send(SPAWN)
        if not _readable(self.control.fileno(), timeout):
            raise OSError("the ONNX validator template did not fork in time")
        data, fds, flags, _addr = socket.recv_fds(self.control, 256, len(SPAWN_FDS))
        if len(fds) != len(SPAWN_FDS) or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise OSError(f"the ONNX validator template answered {len(data)} bytes and "
                          f"{len(fds)} descriptors")
        pid = json.loads(data)["pid"]
        return Validator(int(pid), dict(zip(SPAWN_FDS, fds, strict=True)), stderr_bytes)

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(OSError):
            if self.process.poll() is None:
                self.process.kill()

    def reap(self) -> None:
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)
        with contextlib.suppress(OSError):
            self.control.close()
        self.stderr.join(1.0)


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has data (or EOF) within ``timeout`` s. ``poll``, not ``select``: the
    broker may hold descriptors numbered past select's 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))
