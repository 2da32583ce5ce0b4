"""Estimator pickles read without running their code (issue 14), end to end through the real
broker, engine and image: under ``allow_code`` the policy loader's reading in a second sandbox
verifies the conversion; under ``safe_only`` it is the conversion, and a pickle naming a global
outside the allowlist is refused with that global named."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from airlock_client import Client
from tests.conftest import BrokerProcess, run_cli
from tests.fixtures import models

pytestmark = pytest.mark.integration


def _predictions(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return np.asarray(session.run(None, {name: x.astype(np.float32)})[1])


def test_allow_code_conversion_is_the_policy_loaders_reading_alone(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """The reading that executes nothing goes first; refusing nothing, it is the answer."""
    artifact, check = models.make_sklearn_joblib(tmp_path, compress=3)
    out = tmp_path / "model.onnx"
    with Client(broker.address) as client:
        result = client.convert(artifact, out)
    assert result.assurance == "integrity_verified", result.integrity_note
    assert "refused no global" in result.integrity_note
    assert result.report.executed_artifact_code is False
    assert result.report.loader == "policy loader"
    np.testing.assert_allclose(_predictions(out, check.sample),
                               check.model.predict_proba(check.sample), atol=1e-5)


def test_a_pipeline_with_a_scaler_a_forest_and_xgboost_is_integrity_verified(
        broker: BrokerProcess, tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier, VotingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from xgboost import XGBClassifier

    x, y = models.classification_data()
    model = make_pipeline(StandardScaler(), VotingClassifier(
        [("forest", RandomForestClassifier(n_estimators=8, random_state=0)),
         ("xgb", XGBClassifier(n_estimators=8, max_depth=3))],
        voting="soft", flatten_transform=False)).fit(x, y)
    artifact = tmp_path / "mixed.joblib"
    import joblib

    joblib.dump(model, artifact)
    out = tmp_path / "mixed.onnx"
    with Client(broker.address) as client:
        result = client.convert(artifact, out)
    assert result.assurance == "integrity_verified", result.integrity_note
    assert result.report.executed_artifact_code is False
    sample = x[:40].astype(np.float32)
    np.testing.assert_allclose(_predictions(out, sample), model.predict_proba(sample),
                               atol=1e-4)


def test_safe_only_converts_an_estimator_without_running_its_code(
        broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, check = models.make_lightgbm_pipeline_pickle(tmp_path)
    out = tmp_path / "model.onnx"
    done = run_cli("convert", str(artifact), "-o", str(out), "--policy", "safe_only", "--json",
                   server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["executed_artifact_code"] is False, doc
    assert doc["assurance"] == "integrity_verified", doc
    np.testing.assert_allclose(_predictions(out, check.sample),
                               check.model.predict_proba(check.sample), atol=1e-5)


def test_safe_only_refuses_a_global_outside_the_allowlist_by_name(
        broker: BrokerProcess, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, y = models.classification_data()
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression()).fit(abs(x), y)
    artifact = tmp_path / "log1p.pkl"
    artifact.write_bytes(pickle.dumps(model))
    done = run_cli("convert", str(artifact), "--policy", "safe_only", "--json",
                   server=broker.address)
    assert done.returncode != 0, done.stdout
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "POLICY_VIOLATION"), doc
    assert "numpy.log1p" in doc["message"], doc


def test_a_global_the_model_needs_leaves_the_result_format_safe_only(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """Tensors pickled with plain pickle rebuild through torch, which the policy loader does
    not hand out: the conversion (allow_code) stands, unverified, and says why."""
    import torch

    artifact = tmp_path / "tensors.pkl"
    artifact.write_bytes(pickle.dumps({"w": torch.arange(6.0).reshape(2, 3)}))
    with Client(broker.address) as client:
        result = client.convert(artifact, tmp_path / "w.safetensors")
    assert result.assurance == "format_safe_only"
    assert "policy loader does not allow torch." in result.integrity_note, \
        result.integrity_note
