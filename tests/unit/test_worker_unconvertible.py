"""A pipeline with a step skl2onnx has no converter for is refused with one sentence that
names the step and its class (never skl2onnx's paragraph, a traceback or a dict repr)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from airlock_sandbox.contract import JobSpec, WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import sklearn_convert
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job


class Doubler(BaseEstimator, TransformerMixin):  # type: ignore[misc]
    """A custom step: Python code, which no ONNX converter can translate."""

    def fit(self, x: np.ndarray, y: object = None) -> Doubler:
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return x * 2


def _refusal(model: object, tmp_path: Path) -> WorkerError:
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    with pytest.raises(WorkerError) as err:
        sklearn_convert.convert_object(job, model)
    assert err.value.exit is WorkerExit.UNSUPPORTED_MODEL
    assert not list(tmp_path.iterdir())
    return err.value


def _fitted(model: Pipeline) -> Pipeline:
    x = np.random.default_rng(3).standard_normal((40, 4))
    return model.fit(x, (x[:, 0] > 0).astype(int))


def test_a_custom_step_is_named_with_its_class(tmp_path: Path) -> None:
    model = _fitted(Pipeline([("scale", StandardScaler()), ("double", Doubler()),
                              ("classify", LogisticRegression())]))
    message = _refusal(model, tmp_path).message
    assert message.startswith("skl2onnx has no ONNX converter for step 'double' "
                              f"({__name__}.Doubler): a custom class is Python code")
    assert "Traceback" not in message and "{" not in message and "update_regi" not in message


def test_a_custom_step_inside_a_column_transformer_is_named_by_its_path(tmp_path: Path) -> None:
    columns = ColumnTransformer([("twice", Doubler(), [0, 1])], remainder="passthrough")
    model = _fitted(Pipeline([("columns", columns), ("classify", LogisticRegression())]))
    assert "step 'columns__twice'" in _refusal(model, tmp_path).message


def test_a_custom_estimator_alone_is_named(tmp_path: Path) -> None:
    model = Doubler().fit(np.zeros((3, 4)))
    message = _refusal(model, tmp_path).message
    assert message.startswith(f"skl2onnx has no ONNX converter for {__name__}.Doubler:")
