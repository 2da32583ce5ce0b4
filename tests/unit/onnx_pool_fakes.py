"""A validator process that misbehaves on demand (the model bytes say how).

The pool runs this module instead of ``onnx_worker`` (``worker_module=``); it is the real
worker with a fake ``validate``, standing in for a parser bug or a resource bomb in onnx's C++.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from airlock_broker.validation import onnx_worker
from airlock_broker.validation.limits import GiB, OutputLimits
from airlock_broker.validation.onnx_check import OnnxInfo, validate_onnx_bytes

CRASH = b"crash"
HANG = b"hang"
MEMORY = b"memory"
SPIN = b"spin"
NATIVE_MEMORY = b"native-memory"


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
    if data == SPIN:
        while True:
            pass
    return validate_onnx_bytes(data, limits)


if __name__ == "__main__":
    sys.exit(onnx_worker.main(sys.argv, misbehaving_validate))
