"""Running :func:`validate_onnx_bytes` in a throwaway, rlimited child process.

Parsing and checking hostile protobuf runs onnx's C++ (parser, checker, shape inference), which
has had out-of-bounds bugs (CVE-2024-27319, onnx issue #8275). In the broker process a crash
would take every job down, and a runaway shape inference would hold a worker thread. So the
child gets an address-space, CPU-time and file-size rlimit, no core dumps, and a wall-clock
deadline after which it is killed.

The child could in principle be subverted by the model it parses, so nothing it sends back is
unpickled: it writes the canonical model to a file we name and returns a small JSON document
over a pipe, which we parse strictly and re-type; the reason it reports is restricted to the
output reasons; and we hash the canonical file ourselves.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.validation.files import open_regular_file
from airlock_broker.validation.limits import GiB, OutputLimits
from airlock_broker.validation.onnx_check import (
    OnnxInfo,
    ValueSpec,
    read_onnx_file,
    validate_onnx_bytes,
)
from airlock_broker.validation.strict_json import StrictJSONError, loads_strict

log = logging.getLogger(__name__)

#: The child's JSON answer is a summary; a big one is a lie.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
HASH_BLOCK_BYTES = 1024 * 1024
#: The only reasons a child may report; anything else it says becomes OUTPUT_INVALID.
_CHILD_REASONS = frozenset({Reason.OUTPUT_INVALID, Reason.OUTPUT_TOO_LARGE, Reason.INTERNAL})


@dataclass(frozen=True)
class IsolationLimits:
    """Resources for one validation child. Checked when built."""

    #: Wall clock from spawn to answer, including the child's interpreter start-up and imports.
    timeout_seconds: float = 120.0
    #: Address space the child may map *beyond* what its imports already mapped. A model is
    #: held several times at once (bytes, parsed message, canonical bytes, the checker's copy).
    memory_bytes: int = 4 * GiB
    cpu_seconds: int = 120

    def __post_init__(self) -> None:
        if not isinstance(self.timeout_seconds, int | float) or not self.timeout_seconds > 0:
            raise ValueError("timeout_seconds must be positive")
        for name in ("memory_bytes", "cpu_seconds"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive int")


@dataclass(frozen=True)
class CanonicalOnnxFile:
    """A validated model's canonical form on disk, measured by the broker itself."""

    path: Path
    size: int
    sha256: str
    info: OnnxInfo


def validate_onnx_isolated(
    source: Path,
    dest: Path,
    limits: OutputLimits,
    isolation: IsolationLimits | None = None,
) -> CanonicalOnnxFile:
    """Validate the ONNX file ``source`` in a child process; write its canonical form to ``dest``.

    ``dest`` must not exist (the child creates it exclusively) and is removed on failure.
    Raises ``OUTPUT_INVALID`` / ``OUTPUT_TOO_LARGE`` for a refused model, including one that
    crashes, exhausts or outlives the child; ``INTERNAL`` if the child hit a bug of ours.
    """
    isolation = isolation or IsolationLimits()
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child_main,
        args=(sender, str(source), str(dest), limits, isolation),
        name="airlock-onnx-validate",
        daemon=True,
    )
    ok = False
    try:
        child.start()
        sender.close()  # so that a dead child reads as EOF instead of a silent wait
        answer = _await_answer(receiver, child, isolation.timeout_seconds)
        info = _interpret(answer, child)
        result = _measure(dest, info, limits)
        ok = True
        return result
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
        child.close()
        if not ok:
            try:
                dest.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", dest, exc)


def _await_answer(receiver: Connection, child: Any, timeout: float) -> bytes | None:
    deadline = time.monotonic() + timeout
    if not receiver.poll(timeout):
        child.kill()
        raise error(Reason.OUTPUT_INVALID, f"ONNX validation did not finish in {timeout:g} s")
    try:
        answer = receiver.recv_bytes(MAX_ANSWER_BYTES)
    except EOFError:
        answer = None  # it died before answering; its exit code says how
    except OSError:  # longer than MAX_ANSWER_BYTES
        raise error(Reason.OUTPUT_INVALID, "ONNX validator answered too much") from None
    child.join(max(0.0, deadline - time.monotonic()) + 1.0)
    return answer


def _interpret(answer: bytes | None, child: Any) -> OnnxInfo:
    if answer is None:
        child.join(1.0)
        code = child.exitcode
        if code is not None and code < 0:
            how = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            raise error(Reason.OUTPUT_INVALID, f"ONNX validation crashed ({how})")
        raise error(Reason.OUTPUT_INVALID, f"ONNX validation died (exit code {code})")
    try:
        doc = loads_strict(answer.decode("utf-8"))
        if not isinstance(doc, dict):
            raise StrictJSONError("not an object")
        if doc.get("ok") is True:
            return info_from_json(doc["info"])
        reason_text, message = doc["reason"], doc["message"]
        if not isinstance(reason_text, str) or not isinstance(message, str):
            raise StrictJSONError("reason and message must be strings")
    except (UnicodeDecodeError, StrictJSONError, KeyError, TypeError, ValueError) as exc:
        raise error(Reason.OUTPUT_INVALID, f"ONNX validator answered nonsense: {exc}") from None
    reason = Reason(reason_text) if reason_text in Reason.__members__ else Reason.OUTPUT_INVALID
    if reason not in _CHILD_REASONS:
        reason = Reason.OUTPUT_INVALID
    # The child may be subverted: its words reach logs and callers only as printable text.
    raise error(reason, "".join(c if c.isprintable() else "?" for c in message[:1000]))


def _measure(dest: Path, info: OnnxInfo, limits: OutputLimits) -> CanonicalOnnxFile:
    handle, st = open_regular_file(dest)
    with handle:
        if st.st_size == 0 or st.st_size > limits.max_onnx_bytes:
            raise error(Reason.OUTPUT_INVALID, "canonical ONNX file has an impossible size")
        digest = hashlib.sha256()
        size = 0
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    if size != st.st_size:
        raise error(Reason.OUTPUT_INVALID, "canonical ONNX file changed while it was hashed")
    return CanonicalOnnxFile(path=dest, size=size, sha256=digest.hexdigest(), info=info)


# --- the JSON form of OnnxInfo, read back with every type checked -----------------------------


def info_to_json(info: OnnxInfo) -> dict[str, Any]:
    """``OnnxInfo`` as plain JSON-ready values (tuples become lists)."""
    return asdict(info)


def info_from_json(doc: Any) -> OnnxInfo:
    """Rebuild an ``OnnxInfo`` from :func:`info_to_json` output; ``ValueError`` if malformed."""
    if not isinstance(doc, dict):
        raise ValueError("info is not an object")
    opsets = tuple((_str(d), _int(v)) for d, v in _pairs(doc["opsets"]))
    return OnnxInfo(
        ir_version=_int(doc["ir_version"]),
        opsets=opsets,
        inputs=tuple(_spec(s) for s in _list(doc["inputs"])),
        outputs=tuple(_spec(s) for s in _list(doc["outputs"])),
        node_count=_int(doc["node_count"]),
        producer_name=_str(doc["producer_name"]),
        producer_version=_str(doc["producer_version"]),
    )


def _spec(doc: Any) -> ValueSpec:
    if not isinstance(doc, dict):
        raise ValueError("value spec is not an object")
    elem = doc["elem_type"]
    shape = doc["shape"]
    return ValueSpec(
        name=_str(doc["name"]),
        type=_str(doc["type"]),
        elem_type=None if elem is None else _str(elem),
        shape=None if shape is None else tuple(_dim(d) for d in _list(shape)),
    )


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    items = _list(value)
    if not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise ValueError("expected pairs")
    return [(p[0], p[1]) for p in items]


def _str(value: Any) -> str:
    # Every string onnx_check puts in an OnnxInfo is printable and short; demand the same.
    if not isinstance(value, str) or len(value) > 4096 or not value.isprintable():
        raise ValueError("expected a short printable string")
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        raise ValueError("expected an int")
    return value


def _dim(value: Any) -> int | str | None:
    if value is None or type(value) is int:
        return value
    if isinstance(value, str):
        return _str(value)
    raise ValueError("expected an int, a string or null")


# --- the child ----------------------------------------------------------------------------------


def _vm_size_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _confine(limits: OutputLimits, isolation: IsolationLimits) -> None:
    # Imports (onnx, numpy, protobuf) are mapped already; budget on top of them.
    address_space = _vm_size_bytes() + isolation.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (isolation.cpu_seconds, isolation.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_onnx_bytes, limits.max_onnx_bytes))


def _child_main(
    sender: Connection, source: str, dest: str, limits: OutputLimits, isolation: IsolationLimits
) -> None:
    """Entry point of the child: confine, validate, write ``dest``, answer once, exit."""
    import json

    try:
        _confine(limits, isolation)
        canonical, info = validate_onnx_bytes(read_onnx_file(Path(source), limits), limits)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(dest, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(canonical)
        answer: dict[str, Any] = {"ok": True, "info": info_to_json(info)}
    except AirlockError as exc:
        answer = {"ok": False, "reason": str(exc.reason), "message": exc.message}
    except MemoryError:
        answer = {"ok": False, "reason": str(Reason.OUTPUT_INVALID),
                  "message": "ONNX validation ran out of memory"}
    except Exception as exc:  # a bug of ours; the parent reports INTERNAL
        answer = {"ok": False, "reason": str(Reason.INTERNAL),
                  "message": f"ONNX validation failed: {type(exc).__name__}: {exc}"[:1000]}
    sender.send_bytes(json.dumps(answer).encode())
    sender.close()
