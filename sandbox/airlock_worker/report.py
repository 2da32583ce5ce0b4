"""The informational report written beside the output. The broker never trusts it (DESIGN
§1.4); it is for logs and for people, so it is kept small and plain."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from airlock_sandbox.contract import MAX_REPORT_BYTES, REPORT_WARNING_CHARS, REPORT_WARNINGS

from .errors import one_line

MAX_STRING_CHARS = 300
MAX_LIST_ITEMS = 64

#: Libraries whose versions are worth recording, looked up only if already imported, so
#: writing the report never pays an import.
_VERSIONED = (
    "numpy", "sklearn", "skl2onnx", "onnxmltools", "onnx", "onnxruntime", "onnxscript",
    "torch", "safetensors", "xgboost", "lightgbm", "joblib", "cloudpickle", "skops", "yaml",
)


@dataclass
class ParityEntry:
    """One output compared: the largest differences measured and what was allowed."""

    output_name: str
    samples: int
    max_abs_diff: float
    tolerance: str
    passed: bool
    #: ``max |onnx - ref| / |ref|`` where ``ref`` is not zero.
    max_rel_diff: float = 0.0


@dataclass
class Report:
    detected_format: str = ""
    output_format: str = ""
    loader: str = ""
    converter: str = ""
    executed_artifact_code: bool = False
    #: Globals a restricted reading did not hand out (policy_loader, extract), first first.
    refused_globals: list[str] = field(default_factory=list)
    parity: list[ParityEntry] = field(default_factory=list)
    #: Which rows parity ran on: "sample", or "input_example" and/or "generated", joined by
    #: "+" (parity.check); "" when it did not run.
    parity_inputs: str = ""
    warnings: list[str] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    tensor_count: int = 0
    #: The sha256 of the safetensors data section, when the spec asked for the digest in
    #: place of the bytes (``JobSpec.data_digest_only``): 64 lower-case hex digits.
    data_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    #: seconds spent importing the profile (before the job) and on the job itself.
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    def warn(self, message: str) -> None:
        if len(self.warnings) < REPORT_WARNINGS - 1:
            self.warnings.append(one_line(message, REPORT_WARNING_CHARS))
        elif len(self.warnings) == REPORT_WARNINGS - 1:
            self.warnings.append("further warnings omitted")

    def to_json(self) -> bytes:
        self.versions = imported_versions()
        doc = _capped(asdict(self))
        raw = json.dumps(doc, sort_keys=True, allow_nan=False, default=str).encode()
        if len(raw) > MAX_REPORT_BYTES:  # only warnings and inputs can grow; drop them
            doc["warnings"] = ["report truncated"]
            doc["inputs"] = doc["inputs"][:4]
            raw = json.dumps(doc, sort_keys=True, allow_nan=False, default=str).encode()
        return raw


def imported_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in _VERSIONED:
        mod = sys.modules.get(name)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if isinstance(version, str):
            found[name] = version[:40]
    return found


def _capped(value: Any) -> Any:
    """Cap strings and lists and make floats JSON-safe (NaN/inf are not JSON)."""
    if isinstance(value, str):
        return value[:MAX_STRING_CHARS]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, dict):
        return {str(k)[:MAX_STRING_CHARS]: _capped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_capped(v) for v in list(value)[:MAX_LIST_ITEMS]]
    return value
