"""``airlock convert --sample-input``, through the real broker and image: the caller's rows make
parity pass where the rows the sandbox generates cannot even run, the integrity reading uses
the same rows (the result stays integrity_verified), the provenance names the sample, and a
sample that does not fit the model, or that holds a pickle, is refused with a sentence.

The model is fitted here from code and pickled by the test; only the sandbox unpickles, and
only the sandbox parses the sample."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airlock_client import Client
from tests.conftest import BrokerProcess, run_cli

pytestmark = pytest.mark.integration


def _categories_behind_a_selector(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """CategoricalNB behind a step that says nothing of its inputs' range: the rows parity
    generates are unknown categories, on which the converted graph refuses to run."""
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.naive_bayes import CategoricalNB
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(80, 4)).astype(np.float64)
    y = (x[:, 0] + x[:, 1] > 3).astype(np.int64)
    path = tmp_path / "nb.pkl"
    path.write_bytes(pickle.dumps(make_pipeline(VarianceThreshold(), CategoricalNB()).fit(x, y)))
    return path, x


def _npy(tmp_path: Path, name: str, array: Any, *, allow_pickle: bool = False) -> Path:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


def test_the_callers_rows_make_parity_pass_where_generated_rows_cannot_run(
        broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, x = _categories_behind_a_selector(tmp_path)
    generated = run_cli("convert", str(artifact), "--json", "-o", str(tmp_path / "a.onnx"),
                        server=broker.address)
    assert generated.returncode == 1, generated.stdout + generated.stderr
    doc = json.loads(generated.stdout)
    assert doc["reason"] == "CONVERSION_FAILED", doc
    assert "cannot run the converted model on 64 parity row(s)" in doc["message"], doc

    sample = _npy(tmp_path, "rows.npy", x[:25])
    with Client(broker.address) as client:
        result = client.convert(artifact, tmp_path / "b.onnx", sample_input=sample)
    assert result.report.parity_inputs == "sample"
    assert {p.output_name for p in result.report.parity} == {"label", "probabilities"}
    assert all(p.passed and p.samples == 25 for p in result.report.parity)
    # The second reading (the policy loader) checked its conversion on the same rows.
    assert result.assurance == "integrity_verified", result.integrity_note
    record = result.provenance_record
    assert record is not None and record.record_version == 5
    assert record.sample_sha256 == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert record.parity_tolerance == 0.0
    assert record.conversion["parity_inputs"] == "sample"
    assert {p["output_name"]: p["tolerance"] for p in record.conversion["parity"]} == {
        "label": "exact", "probabilities": "atol=1e-05 rtol=0.0001"}


def test_a_sample_that_does_not_fit_the_model_is_refused_with_a_sentence(
        broker: BrokerProcess, tmp_path: Path) -> None:
    artifact, x = _categories_behind_a_selector(tmp_path)
    narrow = _npy(tmp_path, "narrow.npy", x[:10, :3])
    refused = run_cli("convert", str(artifact), "--json", "-o", str(tmp_path / "c.onnx"),
                      "--sample-input", str(narrow), server=broker.address)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    doc = json.loads(refused.stdout)
    assert (doc["status"], doc["reason"]) == ("rejected", "SAMPLE_INVALID"), doc
    assert "the parity sample does not fit the model's input" in doc["message"], doc
    assert "has 3 features per row; the model takes 4" in doc["message"], doc
    assert not (tmp_path / "c.onnx").exists()


def test_a_sample_holding_a_pickle_is_refused_unread(broker: BrokerProcess,
                                                     tmp_path: Path) -> None:
    artifact, _ = _categories_behind_a_selector(tmp_path)
    hostile = _npy(tmp_path, "objects.npy", np.array([{"a": 1}, None], dtype=object),
                   allow_pickle=True)
    refused = run_cli("convert", str(artifact), "--json", "-o", str(tmp_path / "d.onnx"),
                      "--sample-input", str(hostile), server=broker.address)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    doc = json.loads(refused.stdout)
    assert doc["reason"] == "SAMPLE_INVALID", doc
    assert "holds Python objects" in doc["message"], doc
