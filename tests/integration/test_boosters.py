"""Native booster files and a custom step, end to end through the real broker, engine and
image (issue 14): XGBoost UBJ/JSON and LightGBM text convert under ``safe_only`` with no
artifact code run, as does MLflow's xgboost flavor given as a directory; a pipeline with a
custom step is refused with the step named. Parity is also checked on the host, from the
returned file only, against the live model."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_client import Client, ConversionError
from tests.conftest import BrokerProcess
from tests.fixtures import custom_step
from tests.fixtures.mlflow_models import REQUIREMENTS
from tests.integration.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

ATOL = 1e-5
FEATURES = 5


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((150, FEATURES)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)


def _xgboost(path: Path) -> Any:
    import xgboost

    model = xgboost.XGBClassifier(n_estimators=8, max_depth=3).fit(*_data())
    model.save_model(path)
    return model


def _lightgbm(path: Path) -> Any:
    import lightgbm

    model = lightgbm.LGBMClassifier(n_estimators=8, num_leaves=6, verbose=-1).fit(*_data())
    model.booster_.save_model(path)
    return model


#: name -> (file name, writer, detected format)
CASES: dict[str, tuple[str, Callable[[Path], Any], str]] = {
    "xgboost_ubj": ("model.ubj", _xgboost, "xgboost_ubj"),
    "xgboost_json": ("model.json", _xgboost, "xgboost_json"),
    "lightgbm_text": ("model.txt", _lightgbm, "lightgbm_text"),
}


def _probabilities(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    (inp,) = session.get_inputs()
    return np.asarray(session.run(None, {inp.name: x})[names.index("probabilities")])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_native_booster_converts_under_safe_only_without_running_its_code(
        case: str, cold_broker: BrokerProcess, tmp_path: Path) -> None:
    name, write, detected = CASES[case]
    model = write(tmp_path / name)
    out = tmp_path / "model.onnx"
    began = time.monotonic()
    with Client(cold_broker.address) as client:
        result = client.convert(tmp_path / name, out, loading_policy="safe_only")
    print(f"{case}: {time.monotonic() - began:.2f} s wall, broker {result.duration_seconds:.2f} s,"
          f" {result.size} bytes")  # for -s runs
    assert result.format == "onnx" and result.detected_format == detected
    assert result.report.executed_artifact_code is False
    assert result.report.loader.startswith(("xgboost.Booster", "lightgbm.Booster"))
    assert {p.output_name for p in result.report.parity} == {"label", "probabilities"}
    assert all(p.passed for p in result.report.parity)
    x = _data()[0][:32]
    np.testing.assert_allclose(_probabilities(out, x), model.predict_proba(x), atol=ATOL, rtol=0)


def test_an_mlflow_xgboost_directory_converts_through_the_client(
        cold_broker: BrokerProcess, tmp_path: Path) -> None:
    import mlflow.xgboost

    x, y = _data()
    import xgboost

    model = xgboost.XGBClassifier(n_estimators=6, max_depth=3).fit(x, y)
    where = tmp_path / "model"
    mlflow.xgboost.save_model(model, str(where), input_example=x[:3],  # model.ubj, the default
                              pip_requirements=REQUIREMENTS["xgboost"])
    assert (where / "model.ubj").is_file()
    out = tmp_path / "model.onnx"
    with Client(cold_broker.address) as client:
        result = client.convert(where, out, loading_policy="safe_only")
    assert result.detected_format == "mlflow:xgboost/ubj"
    assert result.report.executed_artifact_code is False
    np.testing.assert_allclose(_probabilities(out, x[:32]), model.predict_proba(x[:32]),
                               atol=ATOL, rtol=0)


def test_an_mlflow_xgboost_model_converts_by_its_registry_uri(
        cold_broker: BrokerProcess, mlflow_registry: MlflowServer, tmp_path: Path) -> None:
    """``airlock convert models:/NAME/1 --policy safe_only``: MLflow's default ``model.ubj``,
    fetched from a registry, converted with no artifact code run."""
    import json

    import mlflow
    import mlflow.xgboost
    import xgboost

    from tests.conftest import run_cli

    x, y = _data()
    model = xgboost.XGBClassifier(n_estimators=6, max_depth=3).fit(x, y)
    where = tmp_path / "model"
    mlflow.xgboost.save_model(model, str(where), input_example=x[:3],
                              pip_requirements=REQUIREMENTS["xgboost"])
    server = mlflow_registry
    mlflow.set_tracking_uri(server.uri)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(where), artifact_path="model")
        mlflow.register_model(f"runs:/{run.info.run_id}/model", "churn-xgb")
    finally:
        mlflow.set_tracking_uri(None)
    done = run_cli("convert", "models:/churn-xgb/1", "--tracking-uri", server.uri,
                   "--policy", "safe_only", "--json", server=cold_broker.address, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["detected_format"] == "mlflow:xgboost/ubj" and not doc["executed_artifact_code"]
    np.testing.assert_allclose(_probabilities(Path(doc["output"]), x[:32]),
                               model.predict_proba(x[:32]), atol=ATOL, rtol=0)


def test_a_pipeline_with_a_custom_step_is_refused_with_the_step_named(
        cold_broker: BrokerProcess, tmp_path: Path) -> None:
    artifact = tmp_path / "pipeline.pkl"
    artifact.write_bytes(custom_step.pipeline_bytes())
    out = tmp_path / "out.onnx"
    with Client(cold_broker.address) as client, pytest.raises(ConversionError) as caught:
        client.convert(artifact, out)
    assert caught.value.reason == "UNSUPPORTED_MODEL", caught.value.message
    assert "step 'double'" in caught.value.message
    assert "Doubler" in caught.value.message and "Traceback" not in caught.value.message
    assert not out.exists()


def test_the_cli_converts_a_booster_with_the_readme_input_shape(
        cold_broker: BrokerProcess, tmp_path: Path) -> None:
    """``airlock convert model.ubj --input-shape -1,5 --policy safe_only``, as typed."""
    import json

    from tests.conftest import run_cli

    model = _xgboost(tmp_path / "model.ubj")
    done = run_cli("convert", str(tmp_path / "model.ubj"), "--input-shape", f"-1,{FEATURES}",
                   "--policy", "safe_only", "--json", server=cold_broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "ok" and doc["executed_artifact_code"] is False, doc
    x = _data()[0][:16]
    np.testing.assert_allclose(_probabilities(Path(doc["output"]), x), model.predict_proba(x),
                               atol=ATOL, rtol=0)
