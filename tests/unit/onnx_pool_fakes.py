"""A validator process that misbehaves on demand (the model bytes say how).

The pool runs this module instead of ``onnx_worker`` (``worker_module=``); it is the real
worker with a fake ``validate``, standing in for a parser bug or a resource bomb in onnx's C++.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from airlock_broker.validation import onnx_worker
from airlock_broker.validation.limits import GiB, OutputLimits

if TYPE_CHECKING:  # onnx is imported only once the process is confined
    from airlock_broker.validation.onnx_check import OnnxInfo

CRASH = b"crash"
HANG = b"hang"
MEMORY = b"memory"
SPIN = b"spin"
NATIVE_MEMORY = b"native-memory"
#: ``connect:PORT``: try to reach a host listener on 127.0.0.1:PORT and refuse with the outcome.
CONNECT = b"connect:"


def misbehaving_validate(data: bytes, limits: OutputLimits) -> tuple[bytes, OnnxInfo]:
    """``validate_onnx_bytes``, except for the magic inputs above."""
    if data == CRASH:  # what an out-of-bounds read in the C++ parser looks like
        os.kill(os.getpid(), signal.SIGSEGV)
    if data == HANG:
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
        from airlock_broker.errors import Reason, error

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
    if data == SPIN:
        while True:
            pass
    from airlock_broker.validation.onnx_check import validate_onnx_bytes

    return validate_onnx_bytes(data, limits)


if __name__ == "__main__":
    sys.exit(onnx_worker.main(sys.argv, misbehaving_validate))
