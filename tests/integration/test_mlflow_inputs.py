"""MLflow models in, ONNX out: local directories and ``models:/`` / ``runs:/`` URIs against a
real tracking server on loopback, through the real broker, engine and image.

The test process saves each model with MLflow and keeps the live original; the converted
ONNX must predict the same within 1e-5. Nothing saved is ever loaded back on the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from airlock_client import Client, ConversionError, mlflow_source
from tests.conftest import BrokerProcess, run_cli
from tests.fixtures import hf_models, mlflow_models
from tests.fixtures.mlflow_models import Saved
from tests.integration.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

ATOL = 1e-5


def _predict(onnx_path: Path, saved: Saved) -> tuple[np.ndarray, np.ndarray]:
    """(converted, original) outputs on the same sample."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    outputs = session.run(None, {inp.name: saved.sample.astype(np.float32)})
    if saved.kind == "torch":
        import torch

        with torch.no_grad():
            expected = saved.model(torch.from_numpy(saved.sample)).numpy()
        return np.asarray(outputs[0]), expected
    names = [o.name for o in session.get_outputs()]
    return (np.asarray(outputs[names.index("probabilities")]),
            saved.model.predict_proba(saved.sample))


@pytest.mark.parametrize("case", sorted(mlflow_models.BENIGN))
def test_mlflow_directory_converts_with_parity(case: str, cold_broker: BrokerProcess,
                                               tmp_path: Path) -> None:
    saved = mlflow_models.BENIGN[case](tmp_path / "model")
    out = tmp_path / "model.onnx"
    with Client(cold_broker.address) as client:
        result = client.convert(saved.path, out)
    assert result.format == "onnx"
    assert result.detected_format.startswith("mlflow:")
    # A pickled estimator is read by the policy loader (issue 14): first, when the client's
    # hint says the bundle holds one (its reading alone answers, executing nothing), else
    # beside the conversion (a pyfunc-only MLmodel names no serialization format).
    verified = case in ("sklearn-pickle", "sklearn-cloudpickle", "pyfunc-wrapping-sklearn")
    assert result.assurance == ("integrity_verified" if verified else "format_safe_only"), \
        result.integrity_note
    if case in ("sklearn-pickle", "sklearn-cloudpickle"):
        assert result.report.executed_artifact_code is False
    got, expected = _predict(out, saved)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # The signature (float32, [-1, 4]) became the ONNX input type.
    (inp,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()
    assert inp.type == "tensor(float)" and inp.shape[1] == mlflow_models.FEATURES


def test_same_directory_gives_the_same_bundle_bytes(cold_broker: BrokerProcess,
                                                    tmp_path: Path) -> None:
    saved = mlflow_models.sklearn_dir(tmp_path / "model", "pickle")
    with Client(cold_broker.address) as client:
        first = client.convert(saved.path, tmp_path / "a.onnx")
        second = client.convert(saved.path, tmp_path / "b.onnx")
    assert first.input_sha256 == second.input_sha256


def test_python_model_is_unsupported_flavor(cold_broker: BrokerProcess,
                                            tmp_path: Path) -> None:
    path = mlflow_models.python_model_dir(tmp_path / "pyfunc")
    with Client(cold_broker.address) as client, pytest.raises(ConversionError) as caught:
        client.convert(path, tmp_path / "out.onnx")
    assert caught.value.reason == "UNSUPPORTED_FLAVOR"
    assert "PythonModel" in caught.value.message
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("policy", ["allow_code", "safe_only"])
def test_malicious_mlflow_sklearn_model_is_contained(policy: str, cold_broker: BrokerProcess,
                                                     tmp_path: Path) -> None:
    """CVE-2024-37052: a reduce payload in model.pkl. It runs only in the sandbox (or, under
    safe_only, not at all); the host marker never appears."""
    marker = tmp_path / "host-marker" / "pwned"
    path = mlflow_models.malicious_sklearn_dir(tmp_path / "evil", marker)
    with Client(cold_broker.address) as client, pytest.raises(ConversionError) as caught:
        client.convert(path, tmp_path / "out.onnx", loading_policy=policy)  # type: ignore[arg-type]
    expected = "POLICY_VIOLATION" if policy == "safe_only" else "UNSUPPORTED_MODEL"
    assert caught.value.reason == expected, caught.value.message
    assert not marker.exists()
    assert not marker.parent.exists()


def test_safe_only_converts_skops_without_executing_code(cold_broker: BrokerProcess,
                                                         tmp_path: Path) -> None:
    saved = mlflow_models.sklearn_dir(tmp_path / "model", "skops")
    out = tmp_path / "model.onnx"
    with Client(cold_broker.address) as client:
        result = client.convert(saved.path, out, loading_policy="safe_only")
    assert result.report.executed_artifact_code is False
    assert result.report.loader == "skops.io.load"
    got, expected = _predict(out, saved)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_registry_and_run_uris_resolve_against_a_real_tracking_server(
        cold_broker: BrokerProcess, mlflow_registry: MlflowServer, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    server = mlflow_registry
    mlflow.set_tracking_uri(server.uri)
    try:
        saved = mlflow_models.sklearn_dir(tmp_path / "local-model", "pickle")
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(saved.path), artifact_path="model")
        registered = mlflow.register_model(f"runs:/{run.info.run_id}/model", "fraud")
        assert registered.version == "1"
        MlflowClient(server.uri).set_registered_model_alias("fraud", "champion", "1")
    finally:
        mlflow.set_tracking_uri(None)

    work = tmp_path / "downloads"
    uris = ["models:/fraud/1", "models:/fraud@champion", f"runs:/{run.info.run_id}/model"]
    with Client(cold_broker.address) as client:
        shas = set()
        for i, uri in enumerate(uris):
            model_dir = mlflow_source.resolve(uri, work, tracking_uri=server.uri)
            assert model_dir.is_relative_to(work)
            out = tmp_path / f"out-{i}.onnx"
            shas.add(client.convert(model_dir, out).input_sha256)
            got, expected = _predict(out, saved)
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # Byte-identical downloads pack to one bundle.
    assert len(shas) == 1

    # The CLI, as a user runs it: output named after the model, in the working directory.
    cli = run_cli("convert", "models:/fraud/1", "--tracking-uri", server.uri, "--json",
                  server=cold_broker.address, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    assert doc["status"] == "ok" and doc["output"] == str(tmp_path / "fraud-1.onnx")
    assert doc["detected_format"] == "mlflow:sklearn/pickle"

    missing = run_cli("convert", "models:/nope/7", "--tracking-uri", server.uri, "--json",
                      server=cold_broker.address, cwd=tmp_path)
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["reason"] == "MLFLOW_DOWNLOAD_FAILED"


def test_a_transformers_model_by_uri_becomes_a_safetensors_directory(
        cold_broker: BrokerProcess, mlflow_registry: MlflowServer, tmp_path: Path) -> None:
    """An MLflow transformers model with pickled weights, fetched by URI, converts as its
    Hugging Face directory: named after the model, in the working directory."""
    import mlflow

    bundle = hf_models.make_mlflow_transformers(tmp_path / "tiny", shards=2)
    server = mlflow_registry
    mlflow.set_tracking_uri(server.uri)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(bundle.path), artifact_path="model")
        mlflow.register_model(f"runs:/{run.info.run_id}/model", "tinylm")
    finally:
        mlflow.set_tracking_uri(None)
    cli = run_cli("convert", "models:/tinylm/1", "--tracking-uri", server.uri, "--json",
                  server=cold_broker.address, cwd=tmp_path, timeout=600)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    out = tmp_path / "tinylm-1-safetensors"
    assert doc["output"] == str(out) and doc["assurance"] == "integrity_verified", doc
    assert len(doc["shards"]) == 2 and "tokenizer.json" in doc["carried"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_cli_converts_a_model_directory(cold_broker: BrokerProcess, tmp_path: Path) -> None:
    saved = mlflow_models.sklearn_dir(tmp_path / "churn", "cloudpickle")
    cli = run_cli("convert", str(saved.path), "--json", server=cold_broker.address)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    assert doc["output"] == str(tmp_path / "churn.onnx")
    # cloudpickle of plain scikit-learn classes: the policy loader's reading is the answer
    assert doc["executed_artifact_code"] is False
    assert doc["assurance"] == "integrity_verified"


def test_cli_refuses_a_model_directory_with_a_symlink(cold_broker: BrokerProcess,
                                                      tmp_path: Path) -> None:
    saved = mlflow_models.sklearn_dir(tmp_path / "model", "pickle")
    (saved.path / "extra").symlink_to("/etc/passwd")
    cli = run_cli("convert", str(saved.path), "--json", server=cold_broker.address)
    assert cli.returncode == 1
    doc = json.loads(cli.stdout)
    assert doc["reason"] == "UNSAFE_MODEL_DIR" and "symbolic link" in doc["message"]
