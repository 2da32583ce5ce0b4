"""Every converter path, end to end through the real broker, engine and image.

Parity is checked on the host from the returned file only: ONNX predictions must match the
original model's within 1e-5, safetensors tensors must be byte-equal to the originals.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from airlock_client import Client, TensorSpec
from tests.conftest import BrokerProcess
from tests.fixtures import models
from tests.fixtures.models import Check

pytestmark = pytest.mark.integration

ATOL = 1e-5

CASES: dict[str, Callable[[Path], tuple[Path, Check]]] = {
    name: maker for name, maker in models.ALL.items()
}


def _client_specs(check: Check) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in check.inputs)


def _reference(check: Check) -> np.ndarray:
    if check.method == "forward":
        import torch

        with torch.no_grad():
            return check.model(torch.from_numpy(check.sample)).numpy()
    return np.asarray(getattr(check.model, check.method)(check.sample))


def _onnx_prediction(path: Path, check: Check) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    outputs = session.run(None, {inp.name: check.sample})
    names = [o.name for o in session.get_outputs()]
    if check.method == "predict_proba":
        return np.asarray(outputs[names.index("probabilities")])
    if check.method == "predict" and "label" in names:
        return np.asarray(outputs[names.index("label")])
    return np.asarray(outputs[0])


def assert_byte_equal(path: Path, expected: dict[str, np.ndarray]) -> None:
    got = load_file(str(path))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].tobytes() == want.tobytes(), f"{name}: bytes differ"


@pytest.mark.parametrize("name", sorted(CASES))
def test_conversion_preserves_the_model(broker: BrokerProcess, tmp_path: Path,
                                        name: str) -> None:
    artifact, check = CASES[name](tmp_path / "in")
    output = tmp_path / f"out.{check.output}"
    with Client(broker.address) as client:
        result = client.convert(artifact, output, inputs=_client_specs(check))

    assert result.format == check.output
    assert result.detected_format == check.detected
    # A checkpoint's weights (zip or legacy) and an estimator pickle are read a second time
    # without executing anything (the checkpoint reader; the policy loader).
    verifiable = (check.detected in ("pytorch_zip", "pytorch_legacy")
                  and check.output == "safetensors") or check.detected in ("pickle", "joblib")
    assert result.assurance == ("integrity_verified" if verifiable else "format_safe_only")
    if verifiable and check.detected.startswith("pytorch"):
        # tensors only: the reading that executes nothing is the answer, torch never loads it
        assert "that executed nothing and refused no global" in result.integrity_note
        assert result.report.executed_artifact_code is False
    if check.output == "onnx" and check.model is not None:
        want = _reference(check)
        got = _onnx_prediction(output, check)
        np.testing.assert_allclose(got, want.reshape(got.shape), atol=ATOL, rtol=0)
        assert result.report.parity and all(p.passed for p in result.report.parity)
    elif check.output == "onnx":
        x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
        got = _onnx_prediction(output, Check(detected="", output="", sample=x))
        np.testing.assert_allclose(got, x @ check.expected["W"] + check.expected["b"], atol=ATOL)
    else:
        assert_byte_equal(output, check.expected)
    if check.tied:
        with safe_open(str(output), framework="numpy") as fh:
            meta: dict[str, Any] = fh.metadata() or {}
        for removed, kept in check.tied.items():
            assert meta.get(removed) == kept


def test_full_module_without_shapes_gives_its_weights(broker: BrokerProcess,
                                                      tmp_path: Path) -> None:
    artifact, check = models.make_full_module(tmp_path)
    with Client(broker.address) as client:
        result = client.convert(artifact, tmp_path / "w.safetensors")
    assert result.format == "safetensors"
    assert result.report.warnings, "weights-only fallback of the output must be reported"
    assert_byte_equal(tmp_path / "w.safetensors", models._numpy(check.model.state_dict()))


def test_state_dict_to_onnx_is_refused_with_a_reason(broker: BrokerProcess,
                                                     tmp_path: Path) -> None:
    from airlock_client import ConversionError

    artifact, _ = models.make_state_dict(tmp_path)
    with Client(broker.address) as client, pytest.raises(ConversionError) as info:
        client.convert(artifact, tmp_path / "x.onnx", target="onnx")
    assert info.value.reason in {"UNSUPPORTED_MODEL", "INPUT_SPEC_REQUIRED"}
