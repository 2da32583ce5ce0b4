"""Parity that measures the conversion, not the inputs, through the real broker and image:
a model that random inputs made fail (CategoricalNB: negative "categories") converts, the
measured differences reach the caller on success, and the caller's tolerance decides.

The models are fitted here from code and pickled by the test; only the sandbox unpickles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from airlock_client import Client, ConversionError
from tests.conftest import BrokerProcess, run_cli
from tests.fixtures.mlflow_models import REQUIREMENTS

pytestmark = pytest.mark.integration


def _pickled(model: object, path: Path) -> Path:
    path.write_bytes(pickle.dumps(model))
    return path


def test_categorical_nb_converts_on_the_categories_it_counted(broker: BrokerProcess,
                                                             tmp_path: Path) -> None:
    from sklearn.naive_bayes import CategoricalNB

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(80, 3)).astype(np.float64)
    y = (x[:, 0] + x[:, 1] > 3).astype(np.int64)
    artifact = _pickled(CategoricalNB().fit(x, y), tmp_path / "nb.pkl")
    with Client(broker.address) as client:
        result = client.convert(artifact, tmp_path / "nb.onnx")
    by_name = {p.output_name: p for p in result.report.parity}
    assert set(by_name) == {"label", "probabilities"}
    assert by_name["label"].tolerance == "exact" and by_name["label"].max_abs_diff == 0
    probabilities = by_name["probabilities"]
    assert probabilities.passed and probabilities.tolerance == "atol=1e-05 rtol=0.0001"
    assert 0 <= probabilities.max_abs_diff <= 1e-5 and probabilities.max_rel_diff >= 0
    assert probabilities.samples > 1


def _far_from_zero_scaler(tmp_path: Path) -> Path:
    """A scaler whose float32 mean is 3e-4 off the float64 one, divided by a scale of 0.01:
    every ONNX output is 0.03 away from scikit-learn's, far beyond the default tolerance."""
    from sklearn.preprocessing import StandardScaler

    z = np.random.default_rng(1).standard_normal((50, 2))
    x = 10000.0003 + 0.01 * (z - z.mean(axis=0)) / z.std(axis=0)
    return _pickled(StandardScaler().fit(x), tmp_path / "scaler.pkl")


def test_the_callers_tolerance_decides_and_the_difference_is_reported(
        broker: BrokerProcess, tmp_path: Path) -> None:
    artifact = _far_from_zero_scaler(tmp_path)
    strict = run_cli("convert", str(artifact), "--json", "-o", str(tmp_path / "a.onnx"),
                     server=broker.address)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    doc = json.loads(strict.stdout)
    assert doc["reason"] == "PARITY_FAILED", doc
    assert "differs by up to 0.03" in doc["message"], doc["message"]
    assert "allowed: atol=1e-05 rtol=0.0001" in doc["message"], doc["message"]

    loose = run_cli("convert", str(artifact), "--json", "-o", str(tmp_path / "b.onnx"),
                    "--parity-tolerance", "0.1", server=broker.address)
    assert loose.returncode == 0, loose.stdout + loose.stderr
    (entry,) = json.loads(loose.stdout)["parity"]
    assert entry["passed"] and entry["tolerance"] == "atol=0.1 rtol=0.1"
    assert 0.01 < entry["max_abs_diff"] < 0.1 and "max_rel_diff" in entry


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 2.0])
def test_a_tolerance_out_of_bounds_is_a_bad_request(broker: BrokerProcess, tmp_path: Path,
                                                    bad: float) -> None:
    artifact = _far_from_zero_scaler(tmp_path)
    with Client(broker.address) as client, pytest.raises(ConversionError) as err:
        client.convert(artifact, tmp_path / "x.onnx", parity_tolerance=bad)
    assert err.value.reason == "BAD_REQUEST" and "parity tolerance" in err.value.message


def test_input_dtype_float64_alone_gives_a_double_precision_graph(broker: BrokerProcess,
                                                                   tmp_path: Path) -> None:
    import onnx
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(2).standard_normal((60, 5))
    artifact = _pickled(LogisticRegression().fit(x, x[:, 0] > 0), tmp_path / "lr.pkl")
    out = tmp_path / "lr.onnx"
    done = run_cli("convert", str(artifact), "--json", "-o", str(out), "--input-dtype",
                   "float64", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    parity = {p["output_name"]: p for p in json.loads(done.stdout)["parity"]}
    assert parity["probabilities"]["passed"] and parity["probabilities"]["max_abs_diff"] < 1e-9
    (graph_input,) = onnx.load(str(out)).graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1] == 5


def test_an_mlflow_models_input_example_is_parity_s_first_batch(broker: BrokerProcess,
                                                                tmp_path: Path) -> None:
    import warnings

    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(3).standard_normal((40, 3))
    where = tmp_path / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(LogisticRegression().fit(x, x[:, 0] > 0), str(where),
                                  serialization_format="pickle", input_example=x[:7],
                                  pip_requirements=REQUIREMENTS["sklearn"])
    with Client(broker.address) as client:
        result = client.convert(where, tmp_path / "m.onnx")
    assert result.report.parity and all(p.passed for p in result.report.parity)
    assert {p.samples for p in result.report.parity} == {7 + 64 + 1}
