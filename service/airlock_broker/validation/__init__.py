"""Output validation: everything a sandbox hands back is checked here as attacker data.

* ``limits``: the caps, one frozen :class:`OutputLimits`.
* ``files``: taking the output file and the untrusted report out of a dead sandbox's dir.
* ``safetensors_check``: header-only validation, canonical header, chunked canonical stream.
* ``onnx_check``: strict ONNX validation and canonical re-serialisation (a pure function).
* ``onnx_isolation``: the same, in a one-shot rlimited child process with a deadline.
* ``onnx_pool`` / ``onnx_worker``: the broker's way: long-lived rlimited validator processes
  (the broker itself never parses an ONNX output).
* ``strict_json``: the JSON reader the other modules share.

Every refusal is an :class:`~airlock_broker.errors.AirlockError` with reason
``OUTPUT_INVALID`` or ``OUTPUT_TOO_LARGE``; no other exception escapes for bad bytes.
"""

from airlock_broker.validation.files import collect_output, open_regular_file, read_report
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_check import (
    OnnxInfo,
    ValueSpec,
    read_onnx_file,
    validate_onnx_bytes,
    validate_onnx_file,
)
from airlock_broker.validation.onnx_isolation import (
    CanonicalOnnxFile,
    IsolationLimits,
    validate_onnx_isolated,
)
from airlock_broker.validation.safetensors_check import (
    FileIdentity,
    SafetensorsInfo,
    iter_canonical,
    validate_safetensors,
)

__all__ = [
    "CanonicalOnnxFile",
    "FileIdentity",
    "IsolationLimits",
    "OnnxInfo",
    "OutputLimits",
    "SafetensorsInfo",
    "ValueSpec",
    "collect_output",
    "iter_canonical",
    "open_regular_file",
    "read_onnx_file",
    "read_report",
    "validate_onnx_bytes",
    "validate_onnx_file",
    "validate_onnx_isolated",
    "validate_safetensors",
]
