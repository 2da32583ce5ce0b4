"""MLflow models read in place from the read-only bundle: a model file larger than the
sandbox's tmpfs converts (the worker no longer copies it there), and an ``onnx``-flavor
model, whose weights MLflow saves as external data, passes through the ONNX validation.

The broker here runs with a 1 MiB tmpfs so that "larger than the tmpfs" stays small.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from airlock_client import Client
from tests.conftest import IMAGE, BrokerProcess, start_broker
from tests.fixtures import mlflow_models

pytestmark = pytest.mark.integration

TMPFS_BYTES = 1024 * 1024
ATOL = 1e-5


@pytest.fixture(scope="module")
def small_tmpfs_broker(docker_client, tmp_path_factory) -> Iterator[BrokerProcess]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("mlflow-in-place")
    config = tmp / "airlock.toml"
    config.write_text(f'[sandbox]\nimage = "{IMAGE}"\ntmpfs_bytes = {TMPFS_BYTES}\n\n'
                      "[pools]\nmin_warm = 0\n")
    proc = start_broker(tmp, "--config", str(config))
    yield proc
    code = proc.stop()
    assert code == 0, f"broker exited {code}:\n{proc.log.read_text()[-3000:]}"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_model_file_larger_than_the_tmpfs_converts(small_tmpfs_broker: BrokerProcess,
                                                   tmp_path: Path) -> None:
    saved = mlflow_models.padded_sklearn_dir(tmp_path / "model", 3 * TMPFS_BYTES)
    assert (saved.path / "model.pkl").stat().st_size > 3 * TMPFS_BYTES
    out = tmp_path / "model.onnx"
    with Client(small_tmpfs_broker.address) as client:
        result = client.convert(saved.path, out)
    assert result.format == "onnx"
    assert result.detected_format == "mlflow:sklearn/pickle"
    session = _session(out)
    names = [o.name for o in session.get_outputs()]
    (inp,) = session.get_inputs()
    got = session.run(None, {inp.name: saved.sample.astype(np.float32)})
    np.testing.assert_allclose(got[names.index("probabilities")],
                               saved.model.predict_proba(saved.sample), atol=ATOL, rtol=0)


def test_onnx_flavor_with_external_data_passes_through(small_tmpfs_broker: BrokerProcess,
                                                       tmp_path: Path) -> None:
    outputs = 100_000  # 1.6 MB of weights, in an external file larger than the tmpfs
    path, weights = mlflow_models.onnx_dir(tmp_path / "model", outputs)
    assert any(p.stat().st_size > TMPFS_BYTES for p in path.iterdir())
    out = tmp_path / "model.onnx"
    with Client(small_tmpfs_broker.address) as client:
        result = client.convert(path, out)
    assert result.format == "onnx"
    assert result.detected_format == "mlflow:onnx/onnx"
    assert result.report.executed_artifact_code is False
    assert result.report.converter == "passthrough"
    model = onnx.load_model(str(out), load_external_data=False)
    assert all(not t.external_data for t in model.graph.initializer)
    sample = np.random.default_rng(5).random((3, mlflow_models.FEATURES), dtype=np.float32)
    (got,) = _session(out).run(None, {"X": sample})
    np.testing.assert_allclose(got, sample @ weights, atol=ATOL, rtol=1e-5)
