"""A scikit-learn model fitted on a pandas DataFrame (column_inputs.py): one typed ONNX input
per column, read from the fitted model, and parity on a DataFrame drawn where it saw data.
The worker's conversion runs in this process on models the test built (nothing is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_sandbox.contract import JobSpec, TensorSpec, WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import column_inputs, mlflow_example, sklearn_convert
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job
from airlock_worker.parity import Unsupported
from tests.fixtures.models import (
    FRAME_COLUMNS,
    dataframe_pipeline,
    frame_feeds,
    mixed_types_pipeline,
)

ORT_TYPES = {"str": "tensor(string)", "float32": "tensor(float)", "int64": "tensor(int64)"}


def _convert(model: Any, tmp_path: Path, inputs: tuple[TensorSpec, ...] = ()) -> Job:
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE, inputs=inputs),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    sklearn_convert.convert_object(job, model)
    return job


def _session(tmp_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("final", ["logistic", "boosting"])
def test_a_model_fitted_on_a_dataframe_gets_one_typed_input_per_column(
        final: str, tmp_path: Path) -> None:
    model, frame = dataframe_pipeline(final)
    job = _convert(model, tmp_path)
    session = _session(tmp_path)
    inputs = session.get_inputs()
    # Every column, in fitting order (the dropped one too), typed as the model saw it.
    assert [i.name for i in inputs] == list(FRAME_COLUMNS)
    assert [i.type for i in inputs] == [ORT_TYPES[t] for t in FRAME_COLUMNS.values()]
    assert all(i.shape[1] == 1 for i in inputs)
    names = [o.name for o in session.get_outputs()]
    rows = frame.iloc[:80]
    got = session.run(None, frame_feeds(rows, inputs))
    np.testing.assert_allclose(got[names.index("probabilities")], model.predict_proba(rows),
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[names.index("label")], model.predict(rows))
    # Parity ran on the original model, on drawn rows (64 + 1), and passed; a model of
    # trees also on the 64 with missing numbers (its imputer takes them).
    rows = 65 + (64 if final == "boosting" else 0)
    assert job.report.parity_inputs == "generated"
    assert {e.output_name: (e.samples, e.passed) for e in job.report.parity} == {
        "label": (rows, True), "probabilities": (rows, True)}
    assert any("one [rows, 1] input per column, city (string), age (float32)" in w
               for w in job.report.warnings)
    assert not any("parity not checked" in w for w in job.report.warnings)


def test_parity_draws_each_column_where_the_model_saw_data() -> None:
    model, frame = dataframe_pipeline()
    columns = column_inputs.columns(model)
    assert {c.name: c.dtype for c in columns} == FRAME_COLUMNS
    inputs = [{"name": c.name, "dtype": "object" if c.dtype == "str" else c.dtype,
               "shape": [-1, 1]} for c in columns]
    feeds = column_inputs.sampler(columns)(inputs, 2000, 1)
    assert all(f.shape == (2000, 1) for f in feeds.values())
    assert set(feeds["city"][:, 0]) == set(frame["city"]) and feeds["city"].dtype == object
    assert set(feeds["store"][:, 0]) == {101, 205, 377}
    # The scaler's moments (after the imputer, which keeps the columns): mean ~49, sd ~17.
    assert abs(feeds["age"].mean() - frame["age"].mean()) < 2
    assert abs(feeds["age"].std() - frame["age"].std()) < 2
    assert abs(feeds["income"].mean() - frame["income"].mean()) < 1000
    # Dropped by the model: nothing says where it lay (standard normals).
    assert abs(feeds["note_length"].mean()) < 0.2 and abs(feeds["note_length"].std() - 1) < 0.1
    # Seeded: the same rows again.
    again = column_inputs.sampler(columns)(inputs, 2000, 1)
    assert all(np.array_equal(again[n], feeds[n]) for n in feeds)


def test_a_string_column_no_encoder_lists_cannot_be_drawn() -> None:
    sample = column_inputs.sampler([column_inputs.Column("kind", column_inputs.STRING),
                                    column_inputs.Column("x", "float32")])
    inputs = [{"name": "kind", "dtype": "object", "shape": [-1, 1]},
              {"name": "x", "dtype": "float32", "shape": [-1, 1]}]
    with pytest.raises(Unsupported, match="string column 'kind'"):
        sample(inputs, 4, 0)


def test_columns_that_cannot_be_read_ask_for_the_inputs_as_before(tmp_path: Path) -> None:
    model, _ = dataframe_pipeline()
    model.steps[0][1].feature_names_in_ = np.array([1, 2, 3, 4, 5, 6], dtype=object)
    assert column_inputs.columns(model) == []
    with pytest.raises(WorkerError) as err:
        _convert(model, tmp_path)
    assert err.value.exit is WorkerExit.INPUT_SPEC_REQUIRED
    assert "give one input per column" in err.value.message
    assert not (tmp_path / "model.onnx").exists()


def test_inputs_given_per_column_are_checked_for_parity(tmp_path: Path) -> None:
    """As a caller (or an MLflow signature) gives them: before, parity was skipped for any
    model of several inputs."""
    model, frame = dataframe_pipeline()
    dtypes = {"city": "string", "age": "float32", "income": "float32", "plan": "string",
              "store": "int64", "note_length": "float32"}
    job = _convert(model, tmp_path, tuple(TensorSpec(n, d, (-1, 1)) for n, d in dtypes.items()))
    assert {e.output_name: e.passed for e in job.report.parity} == {
        "label": True, "probabilities": True}
    assert not any("parity not checked" in w for w in job.report.warnings)
    session = _session(tmp_path)
    probabilities = session.run(["probabilities"], frame_feeds(frame, session.get_inputs()))[0]
    np.testing.assert_allclose(probabilities, model.predict_proba(frame), atol=1e-5, rtol=0)


#: What ``mlflow.models.infer_signature`` makes of ``customer_frame``: int64 columns are
#: "long", float64 ones "double" (mlflow_model._column_specs maps them so).
SIGNATURE = {"city": "string", "age": "int64", "income": "float64", "plan": "string",
             "store": "int64", "note_length": "float64"}


def _signature_job(tmp_path: Path, dtypes: dict[str, str], *, signature: bool) -> Job:
    spec = JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE,
                   inputs=tuple(TensorSpec(n, d, (-1, 1)) for n, d in dtypes.items()))
    return Job(spec=spec, artifact=str(tmp_path / "unused"), out_dir=str(tmp_path),
               fmt=ArtifactFormat.PICKLE, inputs_from_signature=signature)


@pytest.mark.parametrize("dtypes", [SIGNATURE, {**SIGNATURE, "age": "float64"}],
                         ids=["long-and-double", "double"])
def test_an_mlflow_signature_that_does_not_convert_gives_way_to_the_models_columns(
        dtypes: dict[str, str], tmp_path: Path) -> None:
    """skl2onnx cannot convert these types (an imputer given int64 and double columns; a
    scaler given doubles makes a graph the checker refuses): a DataFrame saved with MLflow's
    inferred signature failed before."""
    model, frame = dataframe_pipeline()
    job = _signature_job(tmp_path, dtypes, signature=True)
    sklearn_convert.convert_object(job, model)
    session = _session(tmp_path)
    assert [i.type for i in session.get_inputs()] == [
        ORT_TYPES[t] for t in FRAME_COLUMNS.values()]
    probabilities = session.run(["probabilities"], frame_feeds(frame, session.get_inputs()))[0]
    np.testing.assert_allclose(probabilities, model.predict_proba(frame), atol=1e-5, rtol=0)
    assert any("the MLflow signature's inputs did not convert" in w
               for w in job.report.warnings)
    assert {e.output_name: e.passed for e in job.report.parity} == {
        "label": True, "probabilities": True}


def test_inputs_the_caller_chose_are_never_replaced(tmp_path: Path) -> None:
    model, _ = dataframe_pipeline()
    job = _signature_job(tmp_path, SIGNATURE, signature=False)
    with pytest.raises(RuntimeError, match="Inputs and outputs should have the same type"):
        sklearn_convert.convert_object(job, model)
    assert not (tmp_path / "model.onnx").exists()


def _converted_with_example(model: Any, doc: dict[str, Any], tmp_path: Path) -> Job:
    """``model`` converted with an MLflow DataFrame example (pandas' split orient) for parity."""
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE,
              parity_example=mlflow_example.parse(doc, "dataframe"))
    sklearn_convert.convert_object(job, model)
    return job


def test_an_mlflow_dataframe_example_is_parity_s_first_batch(tmp_path: Path) -> None:
    model, frame = dataframe_pipeline()
    rows = frame.iloc[:5]
    doc = {"columns": list(rows.columns),
           "data": [[v.item() if hasattr(v, "item") else v for v in r] for r in rows.values]}
    job = _converted_with_example(model, doc, tmp_path)
    assert job.report.parity_inputs == "input_example+generated"
    assert {e.output_name: (e.samples, e.passed) for e in job.report.parity} == {
        "label": (5 + 65, True), "probabilities": (5 + 65, True)}


def test_columns_whose_names_skl2onnx_rewrites_are_fed_and_checked_by_position(
        tmp_path: Path) -> None:
    """skl2onnx names an input after its column with characters other than letters, digits
    and _ replaced: parity must still feed each column its own rows (it was skipped)."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"first name": rng.choice(["ann", "bo"], 200),
                          "x.y": rng.normal(size=200), "Größe": rng.normal(size=200)})
    model = Pipeline([
        ("columns", ColumnTransformer([("names", OneHotEncoder(), ["first name"]),
                                       ("scale", StandardScaler(), ["x.y", "Größe"])])),
        ("forest", RandomForestClassifier(n_estimators=5, random_state=0)),
    ]).fit(frame, (frame["x.y"] > 0).astype(int))
    rows = frame.iloc[:3]
    example = mlflow_example.parse({"columns": list(rows.columns), "data": [
        [v.item() if hasattr(v, "item") else v for v in r] for r in rows.values]}, "dataframe")
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE,
              parity_example=example)
    sklearn_convert.convert_object(job, model)
    # The example names the DataFrame's columns; it still feeds the renamed inputs.
    assert job.report.parity_inputs == "input_example+generated"
    session = _session(tmp_path)
    assert [i.name for i in session.get_inputs()] == ["first_name", "x_y", "Größe"]
    assert {e.output_name: e.passed for e in job.report.parity} == {
        "label": True, "probabilities": True}
    assert any("first_name (string, column 'first name'), x_y (float32, column 'x.y'), "
               "Größe (float32)" in w for w in job.report.warnings), job.report.warnings


def test_an_mlflow_example_with_missing_cells_is_parity_s_first_batch(tmp_path: Path) -> None:
    import json

    model, frame = mixed_types_pipeline()
    rows = frame[frame["city"].isna() | frame["age"].isna()].iloc[:6]
    # As MLflow writes a DataFrame example (pandas' split orient): NaN is null.
    doc = json.loads(rows.to_json(orient="split", index=False))
    assert any(r[0] is None for r in doc["data"]) and any(r[1] is None for r in doc["data"])
    job = _converted_with_example(model, doc, tmp_path)
    assert job.report.parity_inputs == "input_example+generated"
    assert {e.output_name: (e.samples, e.passed) for e in job.report.parity} == {
        "label": (6 + 65, True), "probabilities": (6 + 65, True)}
