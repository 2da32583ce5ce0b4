"""What the broker repeats of a worker's report (api/claims.py), which is untrusted and must
never fail a good conversion (validation/files.py read_report), nor make an answer its client
refuses.

A parity difference that is an integer too large for a double (strict JSON reads a 400-digit
number as an int) made ``_finite`` raise OverflowError, so the broker could neither sign the
record nor make the result header: it is recorded as "no finite number" (None in the record,
NaN in the header), and the client takes the answer. And the largest report the caps let
through still makes a record under the client's size cap (about 71 KB of 256 KiB)."""

from __future__ import annotations

from pathlib import Path

from airlock_broker.api.claims import claims
from airlock_broker.security.keys import SigningKey
from airlock_sandbox.contract import MAX_DIMS, MAX_INPUTS
from airlock_sandbox.strict_json import loads_strict
from tests.unit.test_signed_answer import (  # noqa: F401 (the key fixture)
    ONNX,
    _answer,
    _asked,
    _job,
    _stream,
    key,
)

HUGE = "9" * 400


def test_a_parity_difference_beyond_a_double_is_no_number() -> None:
    report = loads_strict(f'{{"parity": [{{"output_name": "y", "max_abs_diff": {HUGE}, '
                          f'"max_rel_diff": -{HUGE}, "passed": true}}]}}')
    said = claims(report)
    assert said["parity"][0]["max_abs_diff"] is None
    assert said["parity"][0]["max_rel_diff"] is None


def test_an_answer_whose_report_has_one_is_signed_and_taken(key, tmp_path: Path) -> None:  # noqa: F811
    result, request = _job()
    result.report["parity"] = [{"output_name": "label", "max_abs_diff": int(HUGE),
                                "passed": True}]
    header = _answer(key, result, request)
    assert _stream(tmp_path, key, header, ONNX, _asked()).read_bytes() == ONNX


def test_the_largest_report_is_still_taken(key: SigningKey,  # noqa: F811
                                           tmp_path: Path) -> None:
    result, request = _job()
    q = '"\\' * 200
    result.report.update({
        "warnings": [q] * 40,
        "inputs": [{"name": q, "dtype": q, "shape": [-(2**70)] * 20}] * 99,
        "versions": {f"{i:03d}" + q: q for i in range(50)},
        "parity": [{"output_name": q, "tolerance": q, "max_abs_diff": 1.2345678901234567e-300,
                    "max_rel_diff": 1.2345678901234567e-300, "samples": 2**40,
                    "passed": True}] * 20,
        "loader": q, "converter": q, "parity_inputs": q,
        "tensor_count": 2**40})
    header = _answer(key, result, request)
    assert len(result.report["inputs"]) > MAX_INPUTS and MAX_DIMS == 8
    assert _stream(tmp_path, key, header, ONNX, _asked()).read_bytes() == ONNX
