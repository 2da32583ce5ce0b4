"""A worker's report is untrusted and must never fail a good conversion (validation/files.py
read_report): a parity difference that is an integer too large for a double (strict JSON
reads a 400-digit number as an int) made claims.py's ``_finite`` raise OverflowError, so the
broker could neither sign the record nor make the result header. It is recorded as "no finite
number" (None in the record, NaN in the header), and the client takes the answer."""

from __future__ import annotations

from pathlib import Path

from airlock_broker.api.claims import claims
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
    report = loads_strict('{"parity": [{"output_name": "y", "max_abs_diff": %s, '
                          '"max_rel_diff": -%s, "passed": true}]}' % (HUGE, HUGE))
    said = claims(report)
    assert said["parity"][0]["max_abs_diff"] is None
    assert said["parity"][0]["max_rel_diff"] is None


def test_an_answer_whose_report_has_one_is_signed_and_taken(key, tmp_path: Path) -> None:  # noqa: F811
    result, request = _job()
    result.report["parity"] = [{"output_name": "label", "max_abs_diff": int(HUGE),
                                "passed": True}]
    header = _answer(key, result, request)
    assert _stream(tmp_path, key, header, ONNX, _asked()).read_bytes() == ONNX
