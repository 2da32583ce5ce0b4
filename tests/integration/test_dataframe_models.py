"""Models fitted on a pandas DataFrame, through the real broker, engine and image: a plain
pickle, and an MLflow model saved the usual way (a signature inferred from the frame, an
input example). Both were refused or failed before (the default single input cannot feed a
ColumnTransformer that selects columns by name; skl2onnx could not convert the signature's
long and double columns). The test keeps the live model and compares the ONNX output on the
frame's own columns; nothing saved is loaded back on the host."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_client import Client, ConversionResult
from tests.conftest import BrokerProcess
from tests.fixtures.models import (
    FRAME_COLUMNS,
    dataframe_pipeline,
    frame_feeds,
    make_dataframe_pickle,
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
