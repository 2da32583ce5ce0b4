"""What a sandbox said about its work, made safe to repeat: typed, capped and printable.

The worker's report is untrusted (the artifact may have run code in that container). The
broker repeats it twice: in the result header (wire.py) and in the signed record
(provenance.py, under ``conversion``). Both take it from :func:`claims`, so that the two say
the same words to the last character, and a client can hold the header to the record
(airlock_client/_signed_answer.py): a warning or an input spec taken out or changed on the
channel is then a ``RESULT_MISMATCH``, not something the header alone says.
"""

from __future__ import annotations

import math
from typing import Any

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.hostile_text import sanitize
from airlock_sandbox.contract import MAX_DIMS, MAX_INPUTS, REPORT_WARNING_CHARS, REPORT_WARNINGS

MAX_PARITY = 16
MAX_VERSIONS = 32


def claims(report: dict[str, Any]) -> dict[str, Any]:
    """The worker's ``report`` as the broker repeats it: only JSON values (a difference that
    is not a finite number is None), every string printable ASCII and capped."""
    versions = report.get("versions")
    return {
        "loader": sanitize(report.get("loader", ""), 80),
        "converter": sanitize(report.get("converter", ""), 80),
        "executed_artifact_code": report.get("executed_artifact_code") is True,
        "versions": ({sanitize(k, 40): sanitize(v, 40)
                      for k, v in list(versions.items())[:MAX_VERSIONS]}
                     if isinstance(versions, dict) else {}),
        "parity": [{"output_name": sanitize(p.get("output_name", ""), 80),
                    "max_abs_diff": _finite(p.get("max_abs_diff")),
                    "max_rel_diff": _finite(p.get("max_rel_diff")),
                    "tolerance": sanitize(p.get("tolerance", ""), 60),
                    "samples": _count(p.get("samples")),
                    "passed": p.get("passed") is True}
                   for p in _list(report.get("parity"))[:MAX_PARITY] if isinstance(p, dict)],
        "parity_inputs": sanitize(report.get("parity_inputs", ""), 40),
        "warnings": [sanitize(w, REPORT_WARNING_CHARS)
                     for w in _list(report.get("warnings"))[:REPORT_WARNINGS]],
        # The converted model's inputs, as the sandbox read them from its output.
        "inputs": [{"name": sanitize(s.get("name", ""), 128),
                    "dtype": sanitize(s.get("dtype", ""), 20),
                    "shape": [_dim(d) for d in _list(s.get("shape"))[:MAX_DIMS]]}
                   for s in _list(report.get("inputs"))[:MAX_INPUTS] if isinstance(s, dict)],
        "tensor_count": _count(report.get("tensor_count")),
    }


def report_message(said: dict[str, Any]) -> pb.ConversionReport:
    """:func:`claims` as the result header carries them."""
    return pb.ConversionReport(
        loader=said["loader"], converter=said["converter"],
        executed_artifact_code=said["executed_artifact_code"],
        tensor_count=said["tensor_count"],
        parity=[pb.ParityCheck(output_name=p["output_name"], samples=p["samples"],
                               max_abs_diff=_number(p["max_abs_diff"]),
                               tolerance=p["tolerance"], passed=p["passed"],
                               max_rel_diff=_number(p["max_rel_diff"]))
                for p in said["parity"]],
        parity_inputs=said["parity_inputs"],
        warnings=said["warnings"],
        versions=said["versions"],
        inputs=[pb.TensorSpec(name=s["name"], dtype=s["dtype"], shape=s["shape"])
                for s in said["inputs"]],
    )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, min(value, 2**31 - 1))


def _dim(value: Any) -> int:
    """A reported dimension: an int (``-1``, or a number below it, marks a free one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(-(2**62), min(value, 2**31 - 1))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:  # an int beyond a double (strict JSON reads 400 digits as one) is no finite number
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _number(value: float | None) -> float:
    """A difference as the header's double: NaN where the claim had no finite number."""
    return math.nan if value is None else value
