"""The worker's MLflow planning: which member, which loader, which input types; and that a
hostile bundle or an unconvertible flavor is refused before anything is loaded."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest

from airlock_sandbox.contract import JobSpec, TensorSpec, WorkerExit
from airlock_sandbox.formats import ArtifactFormat
from airlock_worker import mlflow_convert, mlflow_model
from airlock_worker.errors import WorkerError
from airlock_worker.job import Job


def _members(*names: str) -> dict[str, zipfile.ZipInfo]:
    return {n: zipfile.ZipInfo(n) for n in ("MLmodel", *names)}


def _plan(flavors: dict[str, Any], *names: str) -> mlflow_model.Plan:
    return mlflow_model.plan({"flavors": flavors}, _members(*names))


def test_sklearn_flavor_names_the_pickle_and_its_format() -> None:
    chosen = _plan({"sklearn": {"pickled_model": "model.skops", "serialization_format": "skops"},
                    "python_function": {"loader_module": "mlflow.sklearn"}}, "model.skops")
    assert (chosen.flavor, chosen.member, chosen.serialization) == \
        ("sklearn", "model.skops", "skops")


def test_missing_serialization_format_means_pickle_as_in_mlflow() -> None:
    assert _plan({"sklearn": {"pickled_model": "model.pkl"}}, "model.pkl").serialization == \
        "pickle"


def test_pytorch_flavor_finds_the_model_in_its_data_directory() -> None:
    pt2 = _plan({"pytorch": {"model_data": "data"}}, "data/model.pt2")
    pth = _plan({"pytorch": {"model_data": "data"}}, "data/model.pth",
                "data/pickle_module_info.txt")
    assert (pt2.member, pt2.serialization) == ("data/model.pt2", "pt2")
    assert (pth.member, pth.serialization) == ("data/model.pth", "pickle")


def test_pyfunc_wrapping_a_supported_flavor_is_converted() -> None:
    chosen = _plan({"python_function": {"loader_module": "mlflow.sklearn",
                                        "data": "data/model.pkl"}}, "data/model.pkl")
    assert (chosen.flavor, chosen.member) == ("sklearn", "data/model.pkl")


@pytest.mark.parametrize("pyfunc", [
    {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"},
    {"loader_module": "evil_module", "code": "code"},
    {},
])
def test_python_models_and_unknown_loaders_are_unsupported_flavors(pyfunc: dict[str, Any]) -> None:
    with pytest.raises(WorkerError) as caught:
        _plan({"python_function": pyfunc}, "python_model.pkl")
    assert caught.value.exit is WorkerExit.UNSUPPORTED_FLAVOR


def test_mlmodel_paths_are_contained() -> None:
    with pytest.raises(WorkerError) as caught:
        _plan({"sklearn": {"pickled_model": "../../../etc/passwd"}}, "model.pkl")
    assert caught.value.exit is WorkerExit.UNSAFE_MODEL_DIR


def test_code_and_custom_pickle_modules_are_ignored_with_a_warning() -> None:
    chosen = _plan({"pytorch": {"model_data": "data", "code": "code"},
                    "python_function": {"pickle_module_name": "evil.module"}}, "data/model.pth")
    assert any("not imported" in w for w in chosen.warnings)
    assert any("evil.module" in w for w in chosen.warnings)


def _signature(inputs: str) -> dict[str, Any]:
    return {"flavors": {}, "signature": {"inputs": inputs}}


def test_tensor_signature_becomes_input_specs() -> None:
    specs = mlflow_model.signature_inputs(_signature(
        '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]'), print)
    assert specs == (TensorSpec("input", "float32", (-1, 4)),)


def test_numeric_columns_become_one_input_and_mixed_columns_one_each() -> None:
    warnings: list[str] = []
    same = mlflow_model.signature_inputs(_signature(
        '[{"type": "double", "name": "a"}, {"type": "double", "name": "b"}]'), warnings.append)
    assert same == (TensorSpec("input", "float64", (-1, 2)),) and warnings
    mixed = mlflow_model.signature_inputs(_signature(
        '[{"type": "double", "name": "a"}, {"type": "string", "name": "b"}]'), print)
    assert mixed == (TensorSpec("a", "float64", (-1, 1)), TensorSpec("b", "string", (-1, 1)))


@pytest.mark.parametrize("inputs", [
    '[{"type": "tensor", "tensor-spec": {"dtype": "object", "shape": [-1]}}]',
    '[{"type": "binary", "name": "a"}]',
    '[{"type": "double", "name": "a", "required": false}]',
    'not json', "[]",
])
def test_unmappable_signatures_are_ignored_with_a_warning(inputs: str) -> None:
    warnings: list[str] = []
    assert mlflow_model.signature_inputs(_signature(inputs), warnings.append) == ()
    assert warnings


def test_worker_job_refuses_a_hostile_bundle_before_loading_anything(tmp_path: Path) -> None:
    path = tmp_path / "artifact"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MLmodel", "flavors: {sklearn: {pickled_model: model.pkl}}")
        zf.writestr("../model.pkl", b"\x80\x04.")
    job = Job(spec=JobSpec(job_id="t"), artifact=str(path), out_dir=str(tmp_path),
              fmt=ArtifactFormat.MLFLOW)
    with pytest.raises(WorkerError) as caught:
        mlflow_convert.convert(job)
    assert caught.value.exit is WorkerExit.UNSAFE_MODEL_DIR
    assert job.report.loader == ""


def test_worker_refuses_a_bundle_whose_flavor_is_not_the_hinted_one(tmp_path: Path) -> None:
    path = tmp_path / "artifact"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MLmodel", "flavors: {sklearn: {pickled_model: model.pkl}}")
        zf.writestr("model.pkl", b"\x80\x04N.")
    job = Job(spec=JobSpec(job_id="t", mlflow_flavor="pytorch"), artifact=str(path),
              out_dir=str(tmp_path), fmt=ArtifactFormat.MLFLOW)
    with pytest.raises(WorkerError) as caught:
        mlflow_convert.convert(job)
    assert caught.value.exit is WorkerExit.FORMAT_MISMATCH
    assert "MLflow pytorch model" in caught.value.message and job.report.loader == ""
