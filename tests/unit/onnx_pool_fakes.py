"""A validator process that misbehaves on demand (the model bytes say how).

The pool runs this module instead of ``onnx_worker`` (``worker_module=``); it is the real
worker with a fake ``validate``, standing in for a parser bug or a resource bomb in onnx's C++.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING

from airlock_broker.validation import onnx_worker
from airlock_broker.validation.limits import GiB, OutputLimits
from airlock_broker.validation.onnx_template import JOB_FD

if TYPE_CHECKING:  # onnx is imported only once the process is confined
    from airlock_broker.validation.onnx_info import OnnxInfo

CRASH = b"crash"
HANG = b"hang"
#: Starts its answer (a length for 1 MiB, then 10 bytes of it) and sleeps: no CPU is used, so
#: RLIMIT_CPU never fires; only the broker's deadline ends it.
STALL = b"stall"
MEMORY = b"memory"
SPIN = b"spin"
NATIVE_MEMORY = b"native-memory"
#: Passes, with the validator's pid as its "canonical" bytes: which process served a job.
PID = b"pid"
#: Refuses, saying what the validator sees of the filesystem and who it is.
LOOK = b"look"
#: Refuses after trying to fork, open a socket and signal its parent (the seccomp filter).
SYSCALLS = b"syscalls"
#: Refuses after trying to make a System V shared memory segment, message queue and semaphore
#: set and a POSIX message queue (``IPC_MQ_NAME``): objects that would outlive it.
IPC = b"ipc"
IPC_MQ_NAME = b"/airlock-validator-probe"
#: Refuses after starting as many threads as it can (``MANY_THREADS`` at most), saying how many.
THREADS = b"threads"
MANY_THREADS = 1000
#: Writes terminal escapes, a forged log line and a flood to stderr, then refuses.
STDERR = b"stderr"
STDERR_TEXT = b"\x1b[2J\x1b[31mred\r\nINFO job 1 converted fine\n"
#: ``connect:PORT``: try to reach a host listener on 127.0.0.1:PORT and refuse with the outcome.
CONNECT = b"connect:"


def misbehaving_validate(data: bytes, limits: OutputLimits) -> tuple[bytes, OnnxInfo]:
    """``validate_onnx_bytes``, except for the magic inputs above."""
    from airlock_broker.errors import Reason, error
    from airlock_broker.validation.onnx_check import validate_onnx_bytes

    if data == CRASH:  # what an out-of-bounds read in the C++ parser looks like
        os.kill(os.getpid(), signal.SIGSEGV)
    if data == HANG:
        time.sleep(3600)
    if data == STALL:
        os.write(JOB_FD, struct.pack("!i", 1 << 20) + b"x" * 10)
        time.sleep(3600)
    if data == MEMORY:
        hog = bytearray(16 * GiB)  # refused by RLIMIT_AS: MemoryError
        del hog
    if data == NATIVE_MEMORY:  # a C++ allocator that aborts instead of raising
        try:
            bytearray(16 * GiB)
        except MemoryError:
            os.abort()
    if data.startswith(CONNECT):
        try:
            # No create_connection: its getaddrinfo wants the idna codec, which this
            # unprivileged process could not import (the host's Python lives under /root).
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(("127.0.0.1", int(data[len(CONNECT):])))
            outcome = "connected"
        except OSError as exc:
            outcome = f"failed: {exc}"
        raise error(Reason.OUTPUT_INVALID, f"connect {outcome}")
    if data == PID:
        _canonical, info = validate_onnx_bytes(onnx_worker.tiny_model(), limits)
        return str(os.getpid()).encode(), info
    if data == LOOK:
        seen = {"root": sorted(os.listdir("/")), "uid": os.getuid(), "gid": os.getgid(),
                "proc": os.path.exists("/proc/self"), "tmp": os.path.exists("/tmp")}
        raise error(Reason.OUTPUT_INVALID, f"look {seen}")
    if data == SYSCALLS:
        outcomes = {}
        def fork() -> None:
            if os.fork() == 0:  # allowed: the child leaves at once
                os._exit(0)

        for name, call in (("fork", fork), ("socket", lambda: socket.socket(socket.AF_UNIX)),
                           ("kill", lambda: os.kill(os.getppid(), 0))):
            try:
                call()
                outcomes[name] = "allowed"
            except OSError as exc:
                outcomes[name] = os.strerror(exc.errno or 0)
        raise error(Reason.OUTPUT_INVALID, f"syscalls {outcomes}")
    if data == THREADS:
        raise error(Reason.OUTPUT_INVALID, f"threads {_start_threads()}")
    if data == IPC:
        raise error(Reason.OUTPUT_INVALID, f"ipc {_make_ipc_objects()}")
    if data == STDERR:
        os.write(2, STDERR_TEXT + b"x" * 200_000)
        raise error(Reason.OUTPUT_INVALID, "wrote to stderr")
    if data == SPIN:
        while True:
            pass
    return validate_onnx_bytes(data, limits)


def _start_threads() -> str:
    """Start threads that wait for ever until one cannot start; how many did, and why not."""
    threading.stack_size(64 * 1024)  # MANY_THREADS stacks must fit in RLIMIT_AS
    hold = threading.Event()
    started = 0
    try:
        while started < MANY_THREADS:
            threading.Thread(target=hold.wait, daemon=True).start()
            started += 1
    except RuntimeError as exc:  # "can't start new thread": clone() failed with EAGAIN
        return f"{started} started, then {exc}"
    return f"{started} started, none refused"


def _make_ipc_objects() -> dict[str, str]:
    """Try to make each kind of IPC object (1 MiB of shared memory among them); what each
    call came to. Nothing is removed: a subverted validator would not either."""
    libc = ctypes.CDLL(None, use_errno=True)
    private, create = 0, 0o1000  # IPC_PRIVATE, IPC_CREAT
    calls = {
        "shmget": lambda: libc.shmget(private, 1 << 20, create | 0o600),
        "msgget": lambda: libc.msgget(private, create | 0o600),
        "semget": lambda: libc.semget(private, 1, create | 0o600),
        "mq_open": lambda: libc.mq_open(IPC_MQ_NAME, os.O_CREAT | os.O_RDWR, 0o600, None),
    }
    outcomes = {}
    for name, call in calls.items():
        ctypes.set_errno(0)
        outcomes[name] = "allowed" if call() != -1 else os.strerror(ctypes.get_errno())
    return outcomes


if __name__ == "__main__":
    sys.exit(onnx_worker.main(sys.argv, misbehaving_validate))
