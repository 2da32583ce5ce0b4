"""The ONNX validator process: ``python -m airlock_broker.validation.onnx_worker FD CONFIG``.

Started by ``onnx_pool`` and by nothing else. Before it imports onnx it leaves the network;
then it imports onnx once, warms up on a model of its own, sets its rlimits (no core dumps, dies
with its parent), gives up root and new privileges (``confinement``), says ``ready``, and answers
one request at a time on the socket ``FD``: a JSON request, then the file to validate as a
read-only descriptor (SCM_RIGHTS: the unprivileged process could not open the broker's path); a
JSON answer; and, if the model passed, its canonical bytes. It exits when the socket reaches EOF
(the broker closed it or died).

This module must not import onnx at module level (nor anything that does): it runs before the
process has left the network.

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
import socket
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation.confinement import drop_privileges, enter_empty_network
from airlock_broker.validation.limits import OutputLimits

if TYPE_CHECKING:
    from airlock_broker.validation.onnx_check import OnnxInfo

READY = b"ready"
#: The one data byte that carries the file descriptor of a request.
FD_MARK = b"F"
MAX_REQUEST_BYTES = 64 * 1024
#: File descriptors a validator may hold: its socket, the file it reads, stdio, Python's own.
MAX_FDS = 32
_PR_SET_PDEATHSIG = 1

Validate = Callable[[bytes, OutputLimits], "tuple[bytes, OnnxInfo]"]


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
    # After the uid change: the kernel clears PDEATHSIG when credentials change. Best effort:
    # the socket's EOF ends the loop too, but not a validation in progress. The
    # pool starts validators from the event loop's thread, which lives as long as the broker
    # (PDEATHSIG follows the thread that forked us, not the process).
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before we asked
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


def receive_fd(conn: Connection) -> int | None:
    """The descriptor that follows a request, or None at EOF; ``ValueError`` if it is missing."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        data, fds, flags, _addr = socket.recv_fds(sock, 1, 1)
    finally:
        sock.detach()  # the Connection owns the descriptor
    if not data and not fds:
        return None
    if data != FD_MARK or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request came without exactly one file descriptor")
    received: int = fds[0]
    return received


def answer_for(fd: int, limits: OutputLimits,
               validate: Validate) -> tuple[dict[str, Any], bytes]:
    """The JSON answer for the file open on ``fd`` (closed here) and, if the model passed,
    its canonical bytes."""
    # Imported here, once the process is confined (the first call pays for it, before ready).
    from airlock_broker.validation.onnx_answer import info_to_json
    from airlock_broker.validation.onnx_check import read_onnx_handle

    try:
        with os.fdopen(fd, "rb") as handle:
            data = read_onnx_handle(handle, limits)
        canonical, info = validate(data, limits)
        return {"ok": True, "info": info_to_json(info)}, canonical
    except AirlockError as exc:
        return {"ok": False, "reason": str(exc.reason), "message": exc.message}, b""
    except MemoryError:
        return {"ok": False, "reason": str(Reason.OUTPUT_INVALID),
                "message": "ONNX validation ran out of memory"}, b""
    except Exception as exc:  # a bug of ours; the parent reports INTERNAL
        return {"ok": False, "reason": str(Reason.INTERNAL),
                "message": f"ONNX validation failed: {type(exc).__name__}: {exc}"[:1000]}, b""


def serve(conn: Connection, config: dict[str, Any], validate: Validate,
          own_network: bool = False) -> None:
    """Confine, say ready, then answer requests until EOF."""
    limits_doc = dict(config["limits"])
    limits_doc["allowed_onnx_domains"] = frozenset(limits_doc["allowed_onnx_domains"])
    limits = OutputLimits(**limits_doc)
    settings = config["settings"]
    cpu_seconds = int(settings["cpu_seconds"])
    hard = confine(limits, int(settings["memory_bytes"]), cpu_seconds,
                   int(settings["max_jobs_per_process"]))
    drop_privileges(own_network)  # last, and before anything hostile is read
    _die_with_parent(int(config["parent"]))
    conn.send_bytes(READY)
    while True:
        try:
            request = json.loads(conn.recv_bytes(MAX_REQUEST_BYTES))
            fd = receive_fd(conn)
        except EOFError:
            return
        if fd is None or request != {"validate": True}:
            raise ValueError("malformed request")
        soft = min(hard, int(_cpu_used()) + cpu_seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        answer, canonical = answer_for(fd, limits, validate)
        conn.send_bytes(json.dumps(answer).encode())
        if answer["ok"]:
            conn.send_bytes(canonical)


def _warm_up(validate: Validate) -> None:
    """Validate a tiny model built here, so that every module onnx imports lazily is imported
    while the process may still read the interpreter's files (see ``confinement``)."""
    from onnx import TensorProto, helper

    from airlock_broker.validation import onnx_answer

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm_up", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _canonical, info = validate(model.SerializeToString(), OutputLimits())
    onnx_answer.info_to_json(info)


def main(argv: list[str], validate: Validate | None = None) -> int:
    """``argv``: ``[program, FD, CONFIG]``. ``validate`` defaults to ``validate_onnx_bytes``."""
    config = json.loads(argv[2])
    own_network = enter_empty_network()  # first: nothing below can use the network
    from airlock_broker.validation.onnx_check import validate_onnx_bytes

    _warm_up(validate_onnx_bytes)
    conn = Connection(int(argv[1]))
    try:
        serve(conn, config, validate or validate_onnx_bytes, own_network)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the broker went away mid-answer
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
