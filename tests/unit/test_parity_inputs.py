"""Parity on inputs the fitted model accepts (airlock_worker.parity_inputs), the MLflow input
example as parity's first batch, the caller's tolerance and its bounds, and the measured
differences carried in every parity entry from the worker to the client.

Models are fitted here from code; nothing is unpickled."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airlock_sandbox.contract import MAX_PARITY_TOLERANCE, JobSpec, check_parity_tolerance
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import mlflow_example, parity, parity_inputs, sklearn_convert
from airlock_worker.job import Job

X_SPEC = [{"name": "X", "dtype": "float32", "shape": [-1, 3]}]


def _ints(rows: int = 60, features: int = 3, high: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, high, size=(rows, features)).astype(np.float64)
    return x, (x[:, 0] + x[:, 1] > high - 1).astype(np.int64)


def _convert(model: Any, tmp_path: Path, tolerance: float = 0.0) -> Job:
    """The worker's path for an unpickled model: convert_object -> write_onnx (parity)."""
    job = Job(spec=JobSpec(job_id="t", parity_tolerance=tolerance), artifact="",
              out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sklearn_convert.convert_object(job, model)
    return job


# -- inputs the model accepts ----------------------------------------------------------------


def test_categorical_nb_gets_categories_it_counted_and_converts(tmp_path: Path) -> None:
    from sklearn.naive_bayes import CategoricalNB

    x, y = _ints()
    model = CategoricalNB().fit(x, y)
    with pytest.raises(ValueError):  # what random normals did: negative "categories"
        model.predict(parity.random_feeds(X_SPEC, 64, 1)["X"])
    feeds = parity_inputs.for_model(model)(X_SPEC, 64, 1)
    assert set(np.unique(feeds["X"])) <= {0.0, 1.0, 2.0, 3.0}
    model.predict(feeds["X"])
    job = _convert(model, tmp_path)
    assert os.listdir(tmp_path) and all(e.passed for e in job.report.parity)


def test_ordinal_encoder_gets_known_categories_and_converts(tmp_path: Path) -> None:
    from sklearn.preprocessing import OrdinalEncoder

    x, _ = _ints(high=5)
    model = OrdinalEncoder().fit(x / 4)  # quarters: exact in float32
    feeds = parity_inputs.for_model(model)(X_SPEC, 64, 2)
    model.transform(feeds["X"])  # unknown categories would raise
    job = _convert(model, tmp_path)
    assert [e.output_name for e in job.report.parity] and all(e.passed for e in job.report.parity)


def test_radius_neighbors_gets_points_with_neighbours() -> None:
    """Only the inputs: skl2onnx's radius-neighbours graph marks the points outside the radius
    with index -1, which ONNX Runtime's ArrayFeatureExtractor refuses, whatever the input."""
    from sklearn.neighbors import RadiusNeighborsClassifier

    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 3)) * 10  # far apart: random normals find no neighbour
    y = (x[:, 0] > 0).astype(np.int64)
    model = RadiusNeighborsClassifier(radius=1.0).fit(x, y)
    feeds = parity_inputs.for_model(model)(X_SPEC, 64, 4)
    distances, _ = model.radius_neighbors(feeds["X"])
    assert all(len(d) > 0 for d in distances)
    model.predict(feeds["X"])


def test_a_pipelines_first_step_bounds_the_inputs() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    x, y = _ints()
    x = x * [1, 10, 100] + [5, -50, 1000]
    model = make_pipeline(MinMaxScaler(), LogisticRegression()).fit(x, y)
    feeds = parity_inputs.for_model(model)(X_SPEC, 64, 5)["X"]
    assert (feeds >= x.min(axis=0) - 1e-3).all() and (feeds <= x.max(axis=0) + 1e-3).all()


def test_trees_are_probed_around_their_thresholds() -> None:
    from sklearn.tree import DecisionTreeRegressor

    x, _ = _ints()
    x = x + 1000.0
    model = DecisionTreeRegressor(random_state=0).fit(x, x[:, 0] * 2)
    feeds = parity_inputs.for_model(model)(X_SPEC, 64, 6)["X"]
    assert feeds[:, 0].min() > 990 and feeds[:, 0].max() < 1010  # the feature split on


def test_inputs_are_seeded_bounded_and_fall_back_when_the_model_says_nothing() -> None:
    from sklearn.linear_model import LinearRegression
    from sklearn.naive_bayes import CategoricalNB

    x, y = _ints()
    sample = parity_inputs.for_model(CategoricalNB().fit(x, y))
    a, b = sample(X_SPEC, 64, 9), sample(X_SPEC, 64, 9)
    assert np.array_equal(a["X"], b["X"]) and a["X"].shape == (64, 3)
    assert a["X"].dtype == np.float32
    assert parity_inputs.for_model(LinearRegression().fit(x, y)) is parity.random_feeds
    # Another shape than the model's: the generic inputs.
    other = [{"name": "X", "dtype": "float32", "shape": [-1, 7]}]
    assert sample(other, 4, 1)["X"].shape == (4, 7)


def test_a_dtype_alone_gives_the_model_s_width_and_a_float64_graph(tmp_path: Path) -> None:
    import onnx
    from sklearn.linear_model import LogisticRegression

    from airlock_sandbox.contract import TensorSpec

    x, y = _ints()
    job = Job(spec=JobSpec(job_id="t", inputs=(TensorSpec("X", "float64", (-1, -1)),)),
              artifact="", out_dir=str(tmp_path), fmt=ArtifactFormat.PICKLE)
    sklearn_convert.convert_object(job, LogisticRegression().fit(x, y))
    assert job.report.inputs == [{"name": "X", "dtype": "float64", "shape": [-1, 3]}]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    probabilities = next(o for o in graph.output if o.name == "probabilities")
    assert probabilities.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert all(e.passed and e.max_abs_diff < 1e-12 for e in job.report.parity)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kmeans_is_compared_in_the_precision_it_was_fitted_in(tmp_path: Path,
                                                              dtype: type) -> None:
    """Its compiled path refuses rows of another precision than its centres."""
    from sklearn.cluster import KMeans

    x = np.random.default_rng(0).random((60, 3)).astype(dtype)
    job = _convert(KMeans(n_clusters=3, n_init=2, random_state=0).fit(x), tmp_path)
    assert {e.output_name for e in job.report.parity} == {"label", "scores"}
    assert all(e.passed for e in job.report.parity)


# -- the MLflow input example -----------------------------------------------------------------


def test_mlflow_examples_in_their_written_forms() -> None:
    rows = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    for doc, kind in ((rows, "ndarray"), ({"inputs": rows}, "ndarray"),
                      ({"columns": ["a", "b", "c"], "data": rows}, "dataframe")):
        example = mlflow_example.parse(doc, kind)
        feeds = parity_inputs.example_feeds(example, X_SPEC)
        assert feeds["X"].dtype == np.float32 and feeds["X"].shape == (2, 3)
    named = mlflow_example.parse({"X": rows}, "ndarray")
    assert parity_inputs.example_feeds(named, X_SPEC)["X"].shape == (2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        parity_inputs.example_feeds({None: np.ones((2, 4))}, X_SPEC)


def test_a_dataframe_example_with_strings_feeds_one_input_per_column() -> None:
    doc = {"columns": ["city", "age"], "data": [["rome", 31], ["paris", 47]]}
    example = mlflow_example.parse(doc, "dataframe")
    specs = [{"name": "city", "dtype": "object", "shape": [-1, 1]},
             {"name": "age", "dtype": "float32", "shape": [-1, 1]}]
    feeds = parity_inputs.example_feeds(example, specs)
    assert feeds["city"].tolist() == [["rome"], ["paris"]] and feeds["city"].dtype == object
    assert feeds["age"].tolist() == [[31.0], [47.0]] and feeds["age"].dtype == np.float32
    # A column of strings and numbers, a missing value, unnamed columns: not an example.
    for bad in ({"columns": ["a"], "data": [["x"], [1]]}, {"columns": ["a"], "data": [[None]]},
                {"columns": [0], "data": [["x"]]}):
        with pytest.raises(ValueError):
            mlflow_example.parse(bad, "dataframe")
    # Strings never feed a numeric input, numbers never a string one.
    with pytest.raises(ValueError, match="cannot feed"):
        parity_inputs.example_feeds({"city": example["city"]}, [
            {"name": "city", "dtype": "float32", "shape": [-1, 1]}])
    with pytest.raises(ValueError, match="takes strings"):
        parity_inputs.example_feeds({"age": example["age"]}, [
            {"name": "age", "dtype": "object", "shape": [-1, 1]}])


def test_the_example_is_parity_s_first_batch(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    x, y = _ints()
    job = Job(spec=JobSpec(job_id="t"), artifact="", out_dir=str(tmp_path),
              fmt=ArtifactFormat.PICKLE, parity_example={None: x[:5]})
    sklearn_convert.convert_object(job, LinearRegression().fit(x, y))
    (entry,) = job.report.parity
    assert entry.samples == 5 + parity.PARITY_ROWS + 1


# -- tolerance and what is reported -----------------------------------------------------------


@pytest.mark.parametrize("bad", [-1e-6, math.nan, math.inf, 1.5, MAX_PARITY_TOLERANCE * 2])
def test_a_tolerance_outside_its_bounds_is_refused_with_a_sentence(bad: float) -> None:
    with pytest.raises(ValueError, match="parity tolerance"):
        check_parity_tolerance(bad)


def test_the_tolerance_travels_in_the_job_spec() -> None:
    assert check_parity_tolerance(0) == 0.0 and check_parity_tolerance(1.0) == 1.0
    spec = JobSpec(job_id="t", parity_tolerance=1e-3)
    assert JobSpec.from_json(spec.to_json()).parity_tolerance == 1e-3
    assert JobSpec.from_json(b'{"job_id": "t"}').parity_tolerance == 0.0
    with pytest.raises(ValueError):
        JobSpec.from_json(b'{"job_id": "t", "parity_tolerance": 7}')


def test_the_caller_s_tolerance_decides_and_the_entry_says_what_was_measured() -> None:
    ref = np.array([1.0, 2.0], np.float32)
    got = ref + np.array([5e-4, 0.0], np.float32)
    strict = parity.compare("p", got, parity.Expected(ref), 2)
    loose = parity.compare("p", got, parity.Expected(ref), 2, parity.Tolerance.of(1e-3))
    assert not strict.passed and loose.passed
    assert loose.tolerance == "atol=0.001 rtol=0.001"
    assert strict.tolerance == parity.FLOAT_TOLERANCE == str(parity.Tolerance.of(0))
    for entry in (strict, loose):
        assert entry.max_abs_diff == pytest.approx(5e-4, rel=1e-3)
        assert entry.max_rel_diff == pytest.approx(5e-4, rel=1e-3)


def test_a_passing_conversion_reports_every_output_s_differences(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _ints()
    job = _convert(LogisticRegression().fit(x, y), tmp_path, tolerance=1e-4)
    names = {e.output_name for e in job.report.parity}
    assert names == {"label", "probabilities"}
    for entry in job.report.parity:
        assert entry.passed and entry.max_abs_diff >= 0 and entry.max_rel_diff >= 0
        assert entry.tolerance in ("exact", "atol=0.0001 rtol=0.0001")


def test_the_measured_differences_reach_the_client() -> None:
    from airlock.v1 import airlock_pb2 as pb
    from airlock_broker.api.claims import claims, report_message
    from airlock_client import _wire

    report = {"parity": [{"output_name": "probabilities", "samples": 65, "max_abs_diff": 2e-7,
                          "max_rel_diff": 3e-6, "tolerance": "atol=1e-05 rtol=0.0001",
                          "passed": True}]}
    msg = pb.ConvertResult(output_format=pb.TARGET_FORMAT_ONNX,
                           report=report_message(claims(report)))
    (entry,) = _wire.result(msg, Path("out.onnx")).report.parity
    assert (entry.output_name, entry.samples, entry.passed) == ("probabilities", 65, True)
    assert entry.max_abs_diff == pytest.approx(2e-7) and entry.max_rel_diff == pytest.approx(3e-6)
    assert entry.tolerance == "atol=1e-05 rtol=0.0001"


@pytest.mark.parametrize("bad", [-1.0, math.nan, 2.0])
def test_the_broker_refuses_a_tolerance_out_of_bounds(bad: float) -> None:
    from airlock.v1 import airlock_pb2 as pb
    from airlock_broker.api.wire import job_request
    from airlock_broker.errors import AirlockError, Reason

    meta = pb.ConvertMetadata(parity_tolerance=bad)
    with pytest.raises(AirlockError) as err:
        job_request(meta, "j", default_deadline=60, max_deadline=60)
    assert err.value.reason is Reason.BAD_REQUEST and "parity tolerance" in str(err.value)
    ok = job_request(pb.ConvertMetadata(parity_tolerance=1e-4), "j", default_deadline=60,
                     max_deadline=60)
    assert ok.parity_tolerance == 1e-4


def _bundle(path: Path, model: object, example: bytes) -> Path:
    import pickle
    import zipfile

    mlmodel = ("flavors: {sklearn: {pickled_model: model.pkl, serialization_format: pickle}}\n"
               "saved_input_example_info: {artifact_path: input_example.json, type: ndarray}\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("MLmodel", mlmodel)
        zf.writestr("model.pkl", pickle.dumps(model))
        zf.writestr("input_example.json", example)
    return path


def test_an_mlflow_bundle_s_input_example_is_used_and_a_bad_one_is_said(tmp_path: Path) -> None:
    import json

    from sklearn.linear_model import LogisticRegression

    from airlock_worker import mlflow_convert

    x, y = _ints()
    model = LogisticRegression().fit(x, y)
    for name, example, rows in (("good", json.dumps(x[:3].tolist()).encode(), 3),
                                ("bad", b'[["a", "b", "c"]]', 0)):
        out = tmp_path / name
        out.mkdir()
        job = Job(spec=JobSpec(job_id="t"), artifact=str(_bundle(tmp_path / f"{name}.zip",
                                                                  model, example)),
                  out_dir=str(out), fmt=ArtifactFormat.MLFLOW)
        mlflow_convert.convert(job)
        assert all(e.samples == rows + parity.PARITY_ROWS + 1 for e in job.report.parity)
        noted = [w for w in job.report.warnings if "input example" in w]
        assert bool(noted) == (name == "bad"), job.report.warnings
