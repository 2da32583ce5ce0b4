"""The validator's answer, read back by the broker as attacker data.

A validator process parses hostile protobuf and could be subverted by it, so nothing it sends
back is unpickled: its answer is a small JSON document, parsed strictly and re-typed here; the
reason it reports is restricted to the output reasons; a silent death is read from its exit
code. ``onnx_worker`` writes the answer with :func:`info_to_json`; ``onnx_pool`` reads it with
:func:`interpret`.
"""

from __future__ import annotations

import signal
from dataclasses import asdict
from typing import Any, Protocol

from airlock_broker.errors import Reason, error
from airlock_broker.validation.onnx_info import OnnxInfo, ValueSpec
from airlock_sandbox.strict_json import StrictJSONError, loads_strict

#: The JSON answer is a summary; a big one is a lie.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: The only reasons a validator may report; anything else it says becomes OUTPUT_INVALID.
_CHILD_REASONS = frozenset({Reason.OUTPUT_INVALID, Reason.OUTPUT_TOO_LARGE, Reason.INTERNAL})


class Exited(Protocol):
    """What :func:`interpret` asks of a validator that may have died: its exit code."""

    def join(self, timeout: float) -> None: ...

    @property
    def exitcode(self) -> int | None: ...


def _signal_name(number: int) -> str:
    """``SIGSEGV`` for 11; a real-time signal (``SIGRTMIN`` + n, which a subverted validator
    may send itself) has no name of its own: ``signal 40``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def interpret(answer: bytes | None, child: Exited) -> OnnxInfo:
    """The summary of a passed model, or the ``AirlockError`` the answer (or its absence) means."""
    if answer is None:
        child.join(1.0)
        code = child.exitcode
        if code is not None and code < 0:
            raise error(Reason.OUTPUT_INVALID, f"ONNX validation crashed ({_signal_name(-code)})")
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
