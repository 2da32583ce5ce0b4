"""skl2onnx_mends.py: histogram gradient boosting models convert (every one failed: skl2onnx
writes a leaf's missing-value flag as a Python bool, which onnx refuses among integers), and
trees and forests fitted on data with missing values route them in the graph as scikit-learn
does (every NaN took one branch: other labels for a third of such rows, parity passed). The
conversion runs in this process on models the test built (nothing is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from airlock_sandbox.contract import JobSpec, WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import skl2onnx_mends, sklearn_convert
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job
from tests.fixtures.models import SEED, classification_data


def _rows_with_nan() -> tuple[np.ndarray, np.ndarray]:
    x, y = classification_data(400)
    x[np.random.default_rng(SEED).random(x.shape) < 0.1] = np.nan  # NaN routes are learned
    return x, y


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_histogram_gradient_boosting_converts_and_routes_missing_values(
        kind: str, tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    x, y = _rows_with_nan()
    model: Any = (HistGradientBoostingClassifier(max_iter=20, random_state=SEED).fit(x, y)
                  if kind == "classifier" else
                  HistGradientBoostingRegressor(max_iter=20, random_state=SEED).fit(x, y * 10.0))
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    sklearn_convert.convert_object(job, model)
    assert all(p.passed for p in job.report.parity) and job.report.parity
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    rows = x[np.isnan(x).any(axis=1)][:50]  # parity draws none: the rows the model saw
    got = session.run(None, {session.get_inputs()[0].name: rows})
    if kind == "classifier":
        np.testing.assert_array_equal(got[0], model.predict(rows))
        np.testing.assert_allclose(got[1], model.predict_proba(rows), atol=1e-5, rtol=0)
    else:
        np.testing.assert_allclose(got[0].reshape(-1), model.predict(rows), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", ["RandomForestClassifier", "DecisionTreeRegressor",
                                  "ExtraTreesClassifier"])
def test_trees_fitted_on_missing_values_route_them_as_scikit_learn_does(
        name: str, tmp_path: Path) -> None:
    import sklearn.ensemble
    import sklearn.tree

    x, y = _rows_with_nan()
    kind = getattr(sklearn.ensemble, name, None) or getattr(sklearn.tree, name)
    extra = {} if name.startswith("Decision") else {"n_estimators": 20}
    model = kind(max_depth=5, random_state=SEED, **extra).fit(x, y)
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    sklearn_convert.convert_object(job, model)
    # Parity drew missing values too (64 + 1 rows, then the 64 with an eighth missing).
    assert {(p.samples, p.passed) for p in job.report.parity} == {(65 + 64, True)}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    rows = x[np.isnan(x).any(axis=1)]
    got = session.run(None, {session.get_inputs()[0].name: rows})
    if name.endswith("Classifier"):
        np.testing.assert_array_equal(got[0], model.predict(rows))
        np.testing.assert_allclose(got[1], model.predict_proba(rows), atol=1e-5, rtol=0)
    else:
        np.testing.assert_allclose(got[0].reshape(-1), model.predict(rows), atol=1e-5,
                                   rtol=1e-4)


def test_the_mends_apply_once(tmp_path: Path) -> None:
    from skl2onnx.common import tree_ensemble
    from sklearn.ensemble import RandomForestClassifier

    x, y = classification_data()
    model = RandomForestClassifier(n_estimators=5, random_state=SEED).fit(x, y)
    outputs = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
                  artifact=str(out / "unused"), out_dir=str(out), fmt=ArtifactFormat.PICKLE)
        sklearn_convert.convert_object(job, model)
        outputs.append((out / "model.onnx").read_bytes())
    assert outputs[0] == outputs[1]  # the same graph whether applied once or more
    mended = tree_ensemble.add_node, tree_ensemble.add_tree_to_attribute_pairs
    assert all(m.airlock_mended for m in mended)
    skl2onnx_mends.apply()  # not wrapped twice
    assert (tree_ensemble.add_node, tree_ensemble.add_tree_to_attribute_pairs) == mended


def test_categorical_splits_are_refused_with_their_reason(tmp_path: Path) -> None:
    """skl2onnx writes a categorical split as a numeric threshold: parity refused the graph
    ("differs by up to 1"); the refusal now says why, before converting."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(SEED)
    x = np.column_stack([rng.integers(0, 6, 500), rng.normal(size=500)]).astype(np.float32)
    y = (np.isin(x[:, 0], [1, 4]) ^ (x[:, 1] > 0)).astype(int)
    model = HistGradientBoostingClassifier(max_iter=20, categorical_features=[0]).fit(x, y)
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    with pytest.raises(WorkerError) as caught:
        sklearn_convert.convert_object(job, model)
    assert caught.value.exit is WorkerExit.UNSUPPORTED_MODEL
    assert caught.value.message.startswith(
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting."
        "HistGradientBoostingClassifier was fitted with 1 categorical feature(s)")
    assert not (tmp_path / "model.onnx").exists()


def test_parity_fails_a_graph_that_routes_missing_values_elsewhere() -> None:
    """What the missing-value batch is for: a graph that agrees on every row without NaN and
    not on rows with one is refused (before the routing mend, such forests converted)."""
    from airlock_worker import parity
    from airlock_worker.report import Report

    onnx_bytes = make_onnx_identity()
    inputs = [{"name": "x", "dtype": "float32", "shape": [-1, 3]}]

    def reference(feeds: dict[str, np.ndarray]) -> list[parity.Expected]:
        x = feeds["x"]
        return [parity.Expected(np.where(np.isnan(x), 0.0, x))]  # NaN routed to 0

    plain = parity.random_feeds
    parity.check(onnx_bytes, inputs, reference, Report(), sampler=plain)  # no NaN: agrees
    with pytest.raises(WorkerError) as caught:
        parity.check(onnx_bytes, inputs, reference, Report(),
                     sampler=parity.drawing_missing(plain))
    assert caught.value.exit is WorkerExit.PARITY_FAILED

    def refusing(feeds: dict[str, np.ndarray]) -> list[parity.Expected]:
        if np.isnan(feeds["x"]).any():
            raise ValueError("Input X contains NaN")
        return [parity.Expected(feeds["x"])]

    report = Report()  # a model that takes no missing value: that batch is left out
    parity.check(onnx_bytes, inputs, refusing, report, sampler=parity.drawing_missing(plain))
    assert [(p.samples, p.passed) for p in report.parity] == [(65, True)]


def make_onnx_identity() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("package", ["xgboost", "lightgbm"])
def test_boosters_are_checked_on_missing_values_too(package: str, tmp_path: Path) -> None:
    """XGBoost and LightGBM learn a default direction for missing values at each split, which
    onnxmltools converts (measured: 0 of 385 rows with a NaN differ); parity checks it."""
    import lightgbm
    import xgboost

    x, y = _rows_with_nan()
    model: Any = (xgboost.XGBClassifier(n_estimators=10, max_depth=3) if package == "xgboost"
                  else lightgbm.LGBMClassifier(n_estimators=10, verbose=-1)).fit(x, y)
    job = Job(spec=JobSpec(job_id="t", artifact_format=ArtifactFormat.PICKLE),
              artifact=str(tmp_path / "unused"), out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    sklearn_convert.convert_object(job, model)
    assert {(p.samples, p.passed) for p in job.report.parity} == {(65 + 64, True)}
