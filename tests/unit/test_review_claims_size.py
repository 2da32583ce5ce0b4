"""Review: the largest report a (subverted) sandbox can make still yields an answer an
honest broker's client takes (claims.py caps; the client's record-size cap)."""
from __future__ import annotations

from pathlib import Path

from airlock_sandbox.contract import MAX_DIMS, MAX_INPUTS
from tests.unit.test_signed_answer import ONNX, _answer, _asked, _job, _stream, key  # noqa: F401


def test_the_largest_report_is_still_taken(key, tmp_path: Path) -> None:  # noqa: F811
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
    print(len(header.provenance), header.ByteSize())
    assert len(result.report["inputs"]) > MAX_INPUTS and MAX_DIMS == 8
    assert _stream(tmp_path, key, header, ONNX, _asked()).read_bytes() == ONNX
