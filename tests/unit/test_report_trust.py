"""The worker's report is the word of a sandbox the artifact may have taken over: it may refine
a zip's format, but it cannot rename a pickle or deny that unpickling ran code."""

from __future__ import annotations

from airlock_broker.conversion.jobs import executed_artifact_code, refined_format
from airlock_sandbox.contract import LoadingPolicy
from airlock_sandbox.formats import ArtifactFormat as F


def test_a_report_cannot_rename_a_host_detected_format() -> None:
    for claimed in ("safetensors", "onnx", "\x1b[31monnx", "", None, 7, "mlflow:x"):
        assert refined_format(F.PICKLE, {"detected_format": claimed}) == "pickle"
    assert refined_format(F.NUMPY, None) == "numpy"


def test_a_report_refines_a_zip_only_within_the_zip_family() -> None:
    assert refined_format(F.ZIP, {"detected_format": "pytorch_zip"}) == "pytorch_zip"
    assert refined_format(F.ZIP, {"detected_format": "numpy_npz"}) == "numpy_npz"
    assert refined_format(F.ZIP, {"detected_format": "safetensors"}) == "zip"
    assert refined_format(F.ZIP, {"detected_format": "bogus"}) == "zip"


def test_an_mlflow_bundle_keeps_its_flavour_escaped() -> None:
    assert refined_format(F.MLFLOW, {"detected_format": "mlflow:sklearn/pickle"}) == \
        "mlflow:sklearn/pickle"
    assert refined_format(F.MLFLOW, {"detected_format": "mlflow:\x1b[31m"}) == "mlflow:?[31m"
    assert refined_format(F.MLFLOW, {"detected_format": "safetensors"}) == "mlflow"


def test_unpickled_formats_always_count_as_executed_under_allow_code() -> None:
    for fmt in (F.PICKLE, F.JOBLIB):
        assert executed_artifact_code(fmt, {"executed_artifact_code": False})
        assert executed_artifact_code(fmt, None)
        # under safe_only the policy loader reads them: the worker's "no" is believed
        assert not executed_artifact_code(fmt, {"executed_artifact_code": False},
                                          LoadingPolicy.SAFE_ONLY)
        assert executed_artifact_code(fmt, {"executed_artifact_code": True},
                                      LoadingPolicy.SAFE_ONLY)
    assert not executed_artifact_code(F.NUMPY, {"executed_artifact_code": False})
    assert executed_artifact_code(F.NUMPY, {"executed_artifact_code": True})
    assert not executed_artifact_code(F.ONNX, {"executed_artifact_code": "yes"})
