"""Output validation: everything a sandbox hands back is checked here as attacker data.

* ``limits``: the caps, one frozen :class:`OutputLimits`.
* ``files``: taking the output file and the untrusted report out of a dead sandbox's dir.
* ``safetensors_check``: header-only validation of a hostile safetensors file.
* ``safetensors_canonical``: the canonical header, chunked canonical stream, digest, compare.
* ``onnx_check``: strict ONNX validation and canonical re-serialisation (a pure function);
  ``onnx_info`` what it says of a model, as plain values, and the size cap (no onnx import).
* ``onnx_pool`` / ``onnx_processes`` / ``onnx_template`` / ``onnx_worker``: the broker's way:
  single-use, confined validator processes forked from a template (the broker itself never
  parses an ONNX output; ``confinement``, ``syscall_filter``); ``onnx_answer`` reads their
  answers, ``stderr_pipe`` their stderr.
* ``header_budget``: what a safetensors header costs to parse, bounded before parsing.
* strict JSON comes from ``airlock_sandbox.strict_json`` (shared with the worker and client).

Every refusal is an :class:`~airlock_broker.errors.AirlockError` with reason
``OUTPUT_INVALID`` or ``OUTPUT_TOO_LARGE``; no other exception escapes for bad bytes.

The ``onnx_check`` names are loaded on first use: importing this package must not import onnx,
because a validator process imports ``onnx_worker`` (and so this package) before it is confined.
"""

from typing import TYPE_CHECKING, Any

from airlock_broker.validation.files import collect_output, open_regular_file, read_report
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_info import OnnxInfo, ValueSpec
from airlock_broker.validation.safetensors_canonical import (
    FileIdentity,
    SafetensorsInfo,
    iter_canonical,
    same_canonical,
    with_digest,
)
from airlock_broker.validation.safetensors_check import validate_safetensors

__all__ = [
    "FileIdentity",
    "OnnxInfo",
    "OutputLimits",
    "SafetensorsInfo",
    "ValueSpec",
    "collect_output",
    "iter_canonical",
    "open_regular_file",
    "read_onnx_file",
    "read_report",
    "same_canonical",
    "validate_onnx_bytes",
    "validate_onnx_file",
    "validate_safetensors",
    "with_digest",
]

_ONNX_CHECK_NAMES = frozenset({"read_onnx_file", "validate_onnx_bytes", "validate_onnx_file"})

if TYPE_CHECKING:
    from airlock_broker.validation.onnx_check import (
        read_onnx_file,
        validate_onnx_bytes,
        validate_onnx_file,
    )


def __getattr__(name: str) -> Any:
    if name in _ONNX_CHECK_NAMES:
        from airlock_broker.validation import onnx_check

        return getattr(onnx_check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
