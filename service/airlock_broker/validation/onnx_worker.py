"""The ONNX validator process: ``python -m airlock_broker.validation.onnx_worker FD CONFIG``.

Started by ``onnx_pool`` and by nothing else. It imports onnx once, confines itself (rlimits,
no core dumps, dies with its parent), says ``ready``, and then answers one request at a time on
the socket ``FD``: a JSON request naming a file; a JSON answer; and, if the model passed, its
canonical bytes. It exits when the socket reaches EOF (the broker closed it or died).

``CONFIG`` is JSON: the ``OutputLimits`` fields, the ``ValidatorSettings`` fields, the broker's
pid. Tests run a module of their own instead, which calls :func:`main` with a misbehaving
``validate``.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_check import OnnxInfo, read_onnx_file, validate_onnx_bytes
from airlock_broker.validation.onnx_isolation import info_to_json

READY = b"ready"
MAX_REQUEST_BYTES = 64 * 1024
#: File descriptors a validator may hold: its socket, the file it reads, stdio, Python's own.
MAX_FDS = 32
_PR_SET_PDEATHSIG = 1

Validate = Callable[[bytes, OutputLimits], tuple[bytes, OnnxInfo]]


def _vm_size_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _die_with_parent(parent: int) -> None:
    # Best effort: the socket's EOF ends the loop too, but not a validation in progress. The
    # pool starts validators from the event loop's thread, which lives as long as the broker
    # (PDEATHSIG follows the thread that forked us, not the process).
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died while we were importing onnx
        sys.exit(0)


def confine(limits: OutputLimits, memory_bytes: int, cpu_seconds: int, max_jobs: int) -> int:
    """Set the process-wide limits; return the CPU hard limit (the soft one moves per job)."""
    # Imports (onnx, numpy, protobuf) are mapped already; budget on top of them.
    address_space = _vm_size_bytes() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # It writes no files (answers go over the socket); this bounds what a subverted one could.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_onnx_bytes, limits.max_onnx_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))
    # Every job may use cpu_seconds; the hard limit covers the process's whole life.
    hard = int(_cpu_used()) + cpu_seconds * (max_jobs + 1) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    return hard


def answer_for(source: str, limits: OutputLimits,
               validate: Validate) -> tuple[dict[str, Any], bytes]:
    """The JSON answer for one request and, if the model passed, its canonical bytes."""
    try:
        canonical, info = validate(read_onnx_file(Path(source), limits), limits)
        return {"ok": True, "info": info_to_json(info)}, canonical
    except AirlockError as exc:
        return {"ok": False, "reason": str(exc.reason), "message": exc.message}, b""
    except MemoryError:
        return {"ok": False, "reason": str(Reason.OUTPUT_INVALID),
                "message": "ONNX validation ran out of memory"}, b""
    except Exception as exc:  # a bug of ours; the parent reports INTERNAL
        return {"ok": False, "reason": str(Reason.INTERNAL),
                "message": f"ONNX validation failed: {type(exc).__name__}: {exc}"[:1000]}, b""


def serve(conn: Connection, config: dict[str, Any], validate: Validate) -> None:
    """Confine, say ready, then answer requests until EOF."""
    limits_doc = dict(config["limits"])
    limits_doc["allowed_onnx_domains"] = frozenset(limits_doc["allowed_onnx_domains"])
    limits = OutputLimits(**limits_doc)
    settings = config["settings"]
    cpu_seconds = int(settings["cpu_seconds"])
    hard = confine(limits, int(settings["memory_bytes"]), cpu_seconds,
                   int(settings["max_jobs_per_process"]))
    conn.send_bytes(READY)
    while True:
        try:
            request = json.loads(conn.recv_bytes(MAX_REQUEST_BYTES))
        except EOFError:
            return
        soft = min(hard, int(_cpu_used()) + cpu_seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        answer, canonical = answer_for(request["source"], limits, validate)
        conn.send_bytes(json.dumps(answer).encode())
        if answer["ok"]:
            conn.send_bytes(canonical)


def main(argv: list[str], validate: Validate = validate_onnx_bytes) -> int:
    """``argv``: ``[program, FD, CONFIG]``."""
    config = json.loads(argv[2])
    _die_with_parent(int(config["parent"]))
    conn = Connection(int(argv[1]))
    try:
        serve(conn, config, validate)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the broker went away mid-answer
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
