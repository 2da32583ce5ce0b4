"""A string column the model imputes (string_missing.py): NaN or None to scikit-learn, the
empty string in the graph. scikit-learn's own mixed-types pipeline was refused before
(skl2onnx: "implemented when the missing values are string"). The conversion runs in this
process on models the test built (nothing is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_sandbox.contract import JobSpec
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import column_inputs, sklearn_convert, string_missing
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job
from tests.fixtures.models import frame_feeds, mixed_types_pipeline


def _convert(model: Any, tmp_path: Path) -> Job:
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    sklearn_convert.convert_object(job, model)
    return job


@pytest.mark.parametrize("marker", [np.nan, None], ids=["nan", "none"])
def test_the_mixed_types_pipeline_converts_with_the_empty_string_for_missing(
        marker: Any, tmp_path: Path) -> None:
    model, frame = mixed_types_pipeline(marker)
    job = _convert(model, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()][:2] == [
        ("city", "tensor(string)"), ("age", "tensor(float)")]
    # The frame's own rows, missing cells among them: "" to the graph, the marker to the model.
    missing = frame["city"].map(lambda v: not isinstance(v, str))
    rows = frame[missing].iloc[:20]
    assert len(rows) == 20
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, frame_feeds(rows, session.get_inputs()))
    np.testing.assert_array_equal(got[names.index("label")], model.predict(rows))
    np.testing.assert_allclose(got[names.index("probabilities")], model.predict_proba(rows),
                               atol=1e-5, rtol=0)
    assert "a missing value is the empty string in string input(s) city, plan" in " ".join(
        job.report.warnings)
    assert {e.output_name: e.passed for e in job.report.parity} == {
        "label": True, "probabilities": True}


def test_parity_draws_missing_strings_for_the_graph_and_the_marker_for_the_model() -> None:
    model, _ = mixed_types_pipeline()
    cols = column_inputs.columns(model)
    assert [c.name for c in cols if c.missing is not None] == ["city", "plan"]
    inputs = [{"name": c.name, "dtype": "object" if c.dtype == "str" else c.dtype}
              for c in cols]
    feeds = column_inputs.sampler(cols)(inputs, 400, 7)
    city = feeds["city"].reshape(-1)
    share = float(np.mean(city == ""))
    assert 0.05 < share < 0.25
    frame = column_inputs.frame(cols, feeds)
    assert frame["city"].isna().sum() == (city == "").sum()
    assert set(frame["city"].dropna()) <= {"paris", "berlin", "rome", "lisbon"}


def test_a_model_that_saw_the_empty_string_as_a_value_is_not_remapped(tmp_path: Path) -> None:
    model, frame = mixed_types_pipeline()
    frame.loc[frame.index[:30], "plan"] = ""  # a real category now, besides the NaN
    model.fit(frame, (frame["income"] > 52_000).astype(int))
    assert string_missing.conversion_functions(model) is None
    with pytest.raises((WorkerError, NotImplementedError)) as caught:
        _convert(model, tmp_path)
    assert "missing values are string" in str(getattr(caught.value, "message", caught.value))
    assert not (tmp_path / "model.onnx").exists()


def test_numeric_imputers_and_string_markers_are_left_alone() -> None:
    from sklearn.impute import SimpleImputer

    numbers = SimpleImputer().fit(np.array([[1.0], [np.nan], [3.0]]))
    marked = SimpleImputer(missing_values="?", strategy="most_frequent").fit(
        np.array([["a"], ["?"], ["a"]], dtype=object))
    assert not string_missing.imputes_strings(numbers)
    assert not string_missing.imputes_strings(marked)
    assert string_missing.conversion_functions(numbers) is None

