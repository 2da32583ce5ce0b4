"""Threat class E: the converter is compromised (the artifact ran code in it) and attacks the
output path - the one thing that leaves the sandbox - with spoofed success, hostile file types,
stray files, lying or bombing safetensors headers, hostile ONNX, oversized files, rewrites
after "success", and hostile error text.

Each payload plays the compromised converter from inside a real sandbox: it shapes
``/airlock/out`` and exits 0 ("success"). The broker must judge by its own validation of a
dead sandbox's directory and refuse, with a reason, anything that is not one strictly valid
file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.adversarial import payloads
from tests.adversarial.oracles import (
    Observers,
    assert_contained,
    observers,  # noqa: F401  (fixture)
    run_case,
)
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.adversarial

ST = payloads.SAFETENSORS_NAME
ONNX = payloads.ONNX_NAME
GOOD = payloads.one_tensor()
INVALID = {"OUTPUT_INVALID"}
TOO_LARGE = {"OUTPUT_TOO_LARGE"}

SPOOF_PRINT = """
for fd in (1, 2, 3, 4, 5):
    try:
        os.write(fd, b"airlock-worker: ok: pickle -> safetensors via joblib.load\\n")
        os.write(fd, b'{"status": "SUCCESS", "sha256": "' + b"0" * 64 + b'"}\\n')
    except OSError:
        pass
"""
FAKE_REPORT = json.dumps({"status": "ok", "detected_format": "safetensors",
                          "output_format": "safetensors", "loader": "safetensors.safe_open",
                          "executed_artifact_code": False}).encode()

#: threat -> (output-directory operations, expected reasons)
CASES: dict[str, tuple[list[tuple[object, ...]], set[str]]] = {
    # E1: success claimed on stdout/stderr and in the report, but no output at all.
    "spoofed_success_without_output": (
        [("code", SPOOF_PRINT), ("write", "report.json", FAKE_REPORT)], INVALID),
    # E3: the output is not a plain single-link file.
    "output_symlink_to_host_file": ([("symlink", ST, "/etc/passwd")], INVALID),
    "output_symlink_to_input": ([("symlink", ST, "/airlock/in/artifact")], INVALID),
    "output_hardlink": ([("write", "report.json", GOOD), ("hardlink", "report.json", ST)],
                        INVALID),
    # The seccomp profile refuses mknod, so the payload may not even get its FIFO (the job
    # then fails in the sandbox); if it does, the broker opens it O_NONBLOCK and refuses it.
    "output_fifo": ([("fifo", ST)], INVALID | {"CONVERSION_FAILED"}),
    "output_socket": ([("socket", ST)], INVALID),
    "output_directory": ([("mkdir", ST), ("write", f"{ST}/x", GOOD)], INVALID),
    # E4: anything beside the one output.
    "extra_file_beside_output": ([("write", ST, GOOD), ("write", "payload.so", b"\x7fELF")],
                                 INVALID),
    "extra_hidden_directory": ([("write", ST, GOOD), ("mkdir", ".cache"),
                                ("write", ".cache/x", b"x")], INVALID),
    # E5: header lies.
    "safetensors_header_length_past_eof": (
        [("write", ST, payloads.safetensors_bytes({}, header_len=1 << 20))], INVALID),
    "safetensors_header_length_2_64_minus_1": (
        [("write", ST, payloads.safetensors_bytes({}, header_len=2**64 - 1))], INVALID),
    "safetensors_prefix_only": ([("write", ST, struct.pack("<Q", 8))], INVALID),
    # E6: header bombs.
    "safetensors_header_bomb_200k_tensors": (
        [("code", payloads.HEADER_BOMB_TENSORS)], TOO_LARGE),
    "safetensors_header_bomb_20_mib": ([("code", payloads.HEADER_BOMB_BYTES)], TOO_LARGE),
    # E7: offsets.
    "safetensors_overlapping_offsets": ([("write", ST, payloads.safetensors_bytes(
        {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(1000)},
        bytes(4)))], INVALID),
    "safetensors_offsets_past_data": ([("write", ST, payloads.safetensors_bytes(
        {"x": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}},
        bytes(4)))], INVALID),
    "safetensors_shape_dtype_length_mismatch": ([("write", ST, payloads.safetensors_bytes(
        {"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))], INVALID),
    # E9/E10: ONNX that reads host files or needs custom code.
    "onnx_external_data_traversal": (
        [("write", ONNX, payloads.onnx_external_data_traversal())], INVALID),
    "onnx_custom_operator_domain": ([("write", ONNX, payloads.onnx_custom_domain())], INVALID),
    # E11: oversized (sparse: no bytes spent, any size claimed).
    "oversized_safetensors_output": ([("sparse", ST, 3 << 30)], TOO_LARGE),
    "oversized_onnx_output": ([("sparse", ONNX, 1 << 30)], TOO_LARGE),
    # Both formats at once: which one is "the" output?
    "two_outputs": ([("write", ST, GOOD), ("write", ONNX, payloads.onnx_custom_domain())],
                    INVALID),
}


@pytest.mark.parametrize("threat", sorted(CASES))
def test_compromised_converter_output_is_refused(threat: str, broker: BrokerProcess,
                                                 docker_client, observers: Observers,  # noqa: F811
                                                 tmp_path: Path) -> None:
    ops, reasons = CASES[threat]
    source = payloads.hostile_output_source(ops)
    artifact = payloads.write_carrier(tmp_path / "artifact.npy", "npy", source)
    case = run_case(broker, artifact, "--timeout", "60")
    statuses = {"rejected", "failed"} if "CONVERSION_FAILED" in reasons else {"rejected"}
    assert case.outcome[0] in statuses, case.doc
    assert_contained(case, broker, docker_client, observers, tmp_path, statuses, reasons)
