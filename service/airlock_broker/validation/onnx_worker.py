"""The ONNX validator template: ``python -m airlock_broker.validation.onnx_worker FD CONFIG``.

Started by ``onnx_pool`` and by nothing else. The template never reads a model. Before it
imports onnx it leaves the network and the host's mounts; then it imports onnx once, warms up on
a model of its own, replaces its root with an empty one, gives up root and new privileges
(``confinement``), says ``ready`` on the control socket ``FD`` (SOCK_SEQPACKET), and then, for
each ``spawn`` the broker sends, forks one validator and hands the broker four descriptors: the
validator's job socket, the read end of its stderr pipe, a status pipe on which the template
writes the validator's exit status when it reaps it, and a pidfd to kill it with.

A validator serves exactly one job and exits: it dies with the template (PDEATHSIG), sets its
rlimits, installs its seccomp filter (``syscall_filter``), says ``ready`` on its job socket,
then reads a JSON request and the file to validate as a read-only descriptor (SCM_RIGHTS); it
answers with a JSON summary and, if the model passed, its canonical bytes. So no model a
validator has read can influence the answer given for another: the next job gets a fresh fork
of a template that never read one. The template exits when its control socket reaches EOF (the
broker closed it or died), killing its validators.

This module must not import onnx at module level (nor anything that does): it runs before the
process has left the network.

``CONFIG`` is JSON: the ``OutputLimits`` fields, the ``ValidatorSettings`` fields, the broker's
pid. Tests run a module of their own instead, which calls :func:`main` with a misbehaving
``validate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from airlock_broker.errors import AirlockError, Reason
from airlock_broker.validation import syscall_filter
from airlock_broker.validation.confinement import enter_namespaces
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_template import READY, Template

if TYPE_CHECKING:
    from airlock_broker.validation.onnx_info import OnnxInfo

#: The one data byte that carries the file descriptor of a request.
FD_MARK = b"F"
MAX_REQUEST_BYTES = 64 * 1024
#: File descriptors a validator may hold: its socket, the file it reads, stdio, Python's own.
MAX_FDS = 32
#: Tasks (processes and threads) budgeted for the template and for each validator. A
#: validation starts no thread: with the real worker on a 144 MB MatMul model and a 200-tree
#: forest, every validator was one task throughout (/proc/PID/task, sampled every 0.5 ms) and
#: strace saw no clone from any; the template is one task too. Four leave room for a library
#: that starts a helper thread one day.
TASKS_PER_PROCESS = 4

Validate = Callable[[bytes, OutputLimits], "tuple[bytes, OnnxInfo]"]


def task_limit(processes: int) -> int:
    """RLIMIT_NPROC for the validators of a pool of ``processes``: ``TASKS_PER_PROCESS`` for
    the template and for each validator alive at once.

    The kernel counts every task of the validators' uid (all pools' that share it) and refuses
    a validator a new thread once they are that many. Without it, a subverted validator could
    start threads until the host's pid_max (32768 here) ran out, for as long as its deadline.
    A broker that is not root runs its validators as itself: the count then includes the
    broker's own tasks, and a validator may start fewer threads, or none (none does today). The
    limit binds a validator holding no ``CAP_SYS_RESOURCE`` or ``CAP_SYS_ADMIN``, which
    ``confinement.drop_capabilities`` makes sure of, whoever the broker is.
    """
    return TASKS_PER_PROCESS * (processes + 1)


def confine(limits: OutputLimits, base_vm_bytes: int, memory_bytes: int,
            cpu_seconds: int, tasks: int) -> None:
    """A freshly forked validator's limits (its CPU time starts at zero with the fork);
    ``tasks``: its ``task_limit``."""
    # Imports (onnx, numpy, protobuf) are mapped already; budget on top of them.
    address_space = base_vm_bytes + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # It writes no files (answers go over the socket); this bounds what a subverted one could.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_onnx_bytes, limits.max_onnx_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))
    # SIGXCPU at the soft limit; SIGKILL a second later if it ignores that.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # Threads (it cannot fork: the seccomp filter). Set here, not in the template, which forks.
    resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))


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
    # Imported by the template's warm-up, before its root was emptied.
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


def serve_one(conn: Connection, limits: OutputLimits, settings: dict[str, Any],
              base_vm_bytes: int, validate: Validate) -> None:
    """In a freshly forked validator: confine, say ready, answer one request, return."""
    confine(limits, base_vm_bytes, int(settings["memory_bytes"]), int(settings["cpu_seconds"]),
            task_limit(int(settings["processes"])))
    syscall_filter.install(os.getpid())  # last, and before anything hostile is read
    # While it waits as a spare: touch (and so copy from the template) the pages a validation
    # writes, so that the caller's job does not pay for those page faults.
    validate(tiny_model(), limits)
    conn.send_bytes(READY)
    request = json.loads(conn.recv_bytes(MAX_REQUEST_BYTES))
    fd = receive_fd(conn)
    if fd is None or request != {"validate": True}:
        raise ValueError("malformed request")
    answer, canonical = answer_for(fd, limits, validate)
    conn.send_bytes(json.dumps(answer).encode())
    if answer["ok"]:
        conn.send_bytes(canonical)


def tiny_model() -> bytes:
    """A one-node ONNX model built here (never read from anywhere)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm_up", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def _warm_up(validate: Validate) -> None:
    """Validate a tiny model, so that every module onnx imports lazily is imported while the
    template may still read the interpreter's files (see ``confinement``)."""
    from airlock_broker.validation import onnx_answer, onnx_check

    canonical, info = validate(tiny_model(), OutputLimits())
    onnx_answer.info_to_json(info)
    # A refusal's path too (error formatting, the checker's exception types).
    with contextlib.suppress(Exception):  # a refusal is the point, whichever exception
        validate(canonical[: len(canonical) // 2], OutputLimits())
    del onnx_check  # imported now: every validator reads its model with it


def main(argv: list[str], validate: Validate | None = None) -> int:
    """``argv``: ``[program, FD, CONFIG]``. ``validate`` defaults to ``validate_onnx_bytes``."""
    config = json.loads(argv[2])
    isolated = enter_namespaces()  # first: nothing below can use the network or see the host
    from airlock_broker.validation.onnx_check import validate_onnx_bytes

    _warm_up(validate_onnx_bytes)
    limits_doc = dict(config["limits"])
    limits_doc["allowed_onnx_domains"] = frozenset(limits_doc["allowed_onnx_domains"])
    limits = OutputLimits(**limits_doc)
    settings = config["settings"]
    chosen = validate or validate_onnx_bytes

    def child(conn: Connection, base_vm_bytes: int) -> None:
        serve_one(conn, limits, settings, base_vm_bytes, chosen)

    template = Template(int(argv[1]), settings, int(config["parent"]), isolated)
    template.run(child)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
