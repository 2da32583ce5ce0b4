"""Tabular models as their users hold them, through the real broker, engine and image: a
pipeline fitted on a pandas DataFrame, as a plain pickle, as an MLflow model saved the usual
way (a signature inferred from the frame, an input example) and as a skops file (the format
of Hugging Face's scikit-learn models). All three were refused or failed before (the default
single input cannot feed a ColumnTransformer that selects columns by name; skl2onnx could not
convert the signature's long and double columns; a skops file was no known format). The test
keeps the live model and compares the ONNX output on the frame's own columns; nothing saved
is loaded back on the host. A model pickled by another scikit-learn version than the
sandbox's converts with scikit-learn's warning in the result (it was silenced before), and
scikit-learn's own mixed-types pipeline (string columns imputed, their marker NaN) converts
with the empty string for a missing value (skl2onnx refused it before)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from airlock_client import Client, ConversionError, ConversionResult
from tests.conftest import BrokerProcess
from tests.fixtures.models import (
    FRAME_COLUMNS,
    dataframe_pipeline,
    frame_feeds,
    make_dataframe_pickle,
    make_sklearn_pickle_saved_by,
    mixed_types_pipeline,
)

pytestmark = pytest.mark.integration

ORT_TYPES = {"str": "tensor(string)", "float32": "tensor(float)", "int64": "tensor(int64)"}


def _check_against(out: Path, model: Any, frame: Any, result: ConversionResult) -> None:
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [(i.name, i.type) for i in inputs] == [
        (name, ORT_TYPES[dtype]) for name, dtype in FRAME_COLUMNS.items()]
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, frame_feeds(frame, inputs))
    np.testing.assert_allclose(got[names.index("probabilities")], model.predict_proba(frame),
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[names.index("label")], model.predict(frame))
    assert {p.output_name: p.passed for p in result.report.parity} == {
        "label": True, "probabilities": True}
    assert any("one [rows, 1] input per column, city (string)" in w
               for w in result.report.warnings), result.report.warnings


def test_a_pickled_dataframe_pipeline_converts_with_one_input_per_column(
        broker: BrokerProcess, tmp_path: Path) -> None:
    path, model, frame = make_dataframe_pickle(tmp_path, "boosting")
    out = tmp_path / "model.onnx"
    with Client(broker.address) as client:
        result = client.convert(path, out)
    assert result.format == "onnx"
    # The policy loader's reading, which ran nothing the pickle names, made the same graph.
    assert result.assurance == "integrity_verified", result.integrity_note
    assert result.report.parity_inputs == "generated"
    _check_against(out, model, frame, result)


def _pickled_and_converted(broker: BrokerProcess, model: Any,
                           tmp_path: Path) -> tuple[Path, ConversionResult]:
    """``model`` pickled and converted through the broker: the output's path and the result,
    which the policy loader's reading (nothing the pickle names run) must have verified."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    out = tmp_path / "model.onnx"
    with Client(broker.address) as client:
        result = client.convert(path, out)
    assert result.assurance == "integrity_verified", result.integrity_note
    return out, result


def test_the_mixed_types_pipeline_converts_with_missing_strings_as_empty(
        broker: BrokerProcess, tmp_path: Path) -> None:
    model, frame = mixed_types_pipeline()
    out, result = _pickled_and_converted(broker, model, tmp_path)
    assert any("missing value is the empty string in string input(s) city, plan" in w
               for w in result.report.warnings), result.report.warnings
    assert {p.output_name: p.passed for p in result.report.parity} == {
        "label": True, "probabilities": True}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rows = frame[frame["city"].isna() | frame["plan"].isna()]
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, frame_feeds(rows, session.get_inputs()))
    np.testing.assert_array_equal(got[names.index("label")], model.predict(rows))
    np.testing.assert_allclose(got[names.index("probabilities")], model.predict_proba(rows),
                               atol=1e-5, rtol=0)


def test_a_histogram_gradient_boosting_pipeline_converts(broker: BrokerProcess,
                                                          tmp_path: Path) -> None:
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OrdinalEncoder

    _, frame = mixed_types_pipeline()  # ages missing: the model learns where NaN goes
    frame = frame.astype({"city": str, "plan": str})
    target = ((frame["income"] > 52_000) ^ (frame["city"] == "rome")).astype(int)
    model = make_pipeline(
        make_column_transformer((OrdinalEncoder(handle_unknown="use_encoded_value",
                                                unknown_value=-1), ["city", "plan"]),
                                remainder="passthrough"),
        HistGradientBoostingClassifier(max_iter=20, random_state=0)).fit(frame, target)
    out, result = _pickled_and_converted(broker, model, tmp_path)
    assert {p.output_name: p.passed for p in result.report.parity} == {
        "label": True, "probabilities": True}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rows = frame[frame["age"].isna()]
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, frame_feeds(rows, session.get_inputs()))
    np.testing.assert_array_equal(got[names.index("label")], model.predict(rows))
    np.testing.assert_allclose(got[names.index("probabilities")], model.predict_proba(rows),
                               atol=1e-5, rtol=0)


def test_a_model_saved_by_another_scikit_learn_converts_and_says_so(
        broker: BrokerProcess, tmp_path: Path) -> None:
    path = make_sklearn_pickle_saved_by(tmp_path, "1.0.2")
    with Client(broker.address) as client:
        result = client.convert(path, tmp_path / "model.onnx")
    assert result.assurance == "integrity_verified", result.integrity_note
    notes = [w for w in result.report.warnings if "saved with scikit-learn 1.0.2" in w]
    assert len(notes) == 1, result.report.warnings
    assert notes[0].startswith("saved with scikit-learn 1.0.2, read with 1.")
    assert notes[0].endswith("(LogisticRegression, Pipeline, StandardScaler)")


def test_an_mlflow_model_saved_from_a_dataframe_converts(cold_broker: BrokerProcess,
                                                         tmp_path: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature

    model, frame = dataframe_pipeline()
    saved = tmp_path / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(saved), serialization_format="cloudpickle",
                                  signature=infer_signature(frame, model.predict(frame)),
                                  input_example=frame.iloc[:5])
    out = tmp_path / "model.onnx"
    with Client(cold_broker.address) as client:
        result = client.convert(saved, out)
    assert result.detected_format == "mlflow:sklearn/cloudpickle"
    # The author's five rows first, strings and all, then generated ones.
    assert result.report.parity_inputs == "input_example+generated"
    assert all(p.samples == 5 + 65 for p in result.report.parity)
    assert any("the MLflow signature's inputs did not convert" in w
               for w in result.report.warnings), result.report.warnings
    _check_against(out, model, frame, result)


@pytest.mark.parametrize("policy", ["allow_code", "safe_only"])
def test_a_skops_file_converts_with_skops_trusted_types_alone(
        broker: BrokerProcess, tmp_path: Path, policy: str) -> None:
    import skops.io

    model, frame = dataframe_pipeline()
    path = tmp_path / "model.skops"  # its name declares it (Client.declared_by_name)
    skops.io.dump(model, path)
    out = tmp_path / "model.onnx"
    with Client(broker.address) as client:
        result = client.convert(path, out, loading_policy=policy)  # type: ignore[arg-type]
    assert result.detected_format == "skops"
    assert result.report.executed_artifact_code is False
    assert result.report.loader == "skops.io.load"
    _check_against(out, model, frame, result)


class Doubler(BaseEstimator, TransformerMixin):  # type: ignore[misc]
    """A custom step: outside skops' trusted types."""

    def fit(self, x: Any, y: Any = None) -> Doubler:
        return self

    def transform(self, x: Any) -> Any:
        return x * 2


def test_a_skops_file_naming_other_types_is_refused_under_safe_only(
        broker: BrokerProcess, tmp_path: Path) -> None:
    import skops.io

    x = np.random.default_rng(0).standard_normal((40, 3))
    model = Pipeline([("double", Doubler()), ("classify", LogisticRegression())]).fit(
        x, (x[:, 0] > 0).astype(int))
    path = tmp_path / "custom.skops"
    skops.io.dump(model, path)
    with Client(broker.address) as client, pytest.raises(ConversionError) as err:
        client.convert(path, tmp_path / "custom.onnx", loading_policy="safe_only")
    assert err.value.reason == "POLICY_VIOLATION", err.value
    assert "Doubler" in str(err.value)
    assert not (tmp_path / "custom.onnx").exists()
