"""MLFLOW: a packed MLflow model directory. Re-check the bundle, read ``MLmodel``, open the
one member the flavor names in place (a bounded read-only view of the STORED member inside
the read-only bundle: no copy, so the tmpfs does not cap the model's size), then hand it to
the ordinary converter for its format (sklearn_convert, torch_convert, the ONNX passthrough)
with the MLflow signature as the input types when the request gave none. The request's
loading policy applies unchanged: those converters gate every code-executing loader.

skops files load with skops' default trusted types only, and the few data types
``sklearn_convert.SKOPS_DATA_TYPES`` adds (no artifact code runs); types outside those are
trusted only under allow_code, recorded as executed artifact code.
The ``skops_trusted_types`` list in ``MLmodel`` is the artifact's own claim and is ignored.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import IO

from airlock_sandbox.contract import JobMode, WorkerExit
from airlock_sandbox.formats import PREFIX_BYTES, ArtifactFormat, detect_prefix

from . import mlflow_example, mlflow_model
from .detect import detect
from .errors import WorkerError
from .job import Job
from .member_view import open_member

#: Upper bound on a bundle's members together (the broker's artifact cap is the real one).
MAX_BUNDLE_BYTES = 8 * 1024**3
_EXPECTED = {
    ("sklearn", "pickle"): {ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB},
    ("sklearn", "cloudpickle"): {ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB},
    ("sklearn", "skops"): {ArtifactFormat.ZIP},
    ("pytorch", "pickle"): {ArtifactFormat.PYTORCH_ZIP, ArtifactFormat.PYTORCH_LEGACY},
    ("pytorch", "pt2"): {ArtifactFormat.TORCH_EXPORT},
    ("onnx", "onnx"): {ArtifactFormat.ONNX},
    ("lightgbm", "text"): {ArtifactFormat.LIGHTGBM_TEXT},
    ("lightgbm", "pickle"): {ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB},
    ("lightgbm", "cloudpickle"): {ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB},
    ("lightgbm", "skops"): {ArtifactFormat.ZIP},
}
#: Whatever MLmodel's model_format says (ubj, json, or xgb: XGBoost >= 2.1 writes UBJ under
#: any other name), the bytes decide. XGBoost's old binary format is not read (below).
_XGBOOST_FORMATS = {ArtifactFormat.XGBOOST_UBJ, ArtifactFormat.XGBOOST_JSON}


def convert(job: Job) -> None:
    size = os.stat(job.artifact_path()).st_size
    try:
        zf = zipfile.ZipFile(job.artifact_path())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, f"unreadable bundle: {exc}") from None
    with zf:
        members = mlflow_model.open_members(zf, size, MAX_BUNDLE_BYTES)
        mlmodel = mlflow_model.read_mlmodel(zf, members)
        chosen = mlflow_model.plan(mlmodel, members)
        example = mlflow_example.read(zf, members, mlmodel, job.report.warn)
    hint = job.spec.mlflow_flavor
    if hint is not None and hint != chosen.flavor:
        raise WorkerError(WorkerExit.FORMAT_MISMATCH,
                          f"the request says an MLflow {hint[:20]} model, but MLmodel makes it "
                          f"{chosen.flavor} ({chosen.via})")
    for warning in chosen.warnings:
        job.report.warn(warning)
    inputs = job.spec.inputs or mlflow_model.signature_inputs(mlmodel, job.report.warn)
    with open_member(job.artifact_path(), members[chosen.member]) as view:
        fmt = _format_of(view, chosen)
        artifact: IO[bytes] = view
        if chosen.flavor == "onnx":
            from . import mlflow_onnx

            artifact = mlflow_onnx.self_contained(view, job.artifact_path(), chosen.member,
                                                  members)
        job.report.detected_format = f"mlflow:{chosen.flavor}/{chosen.serialization}"[:32]
        inner = Job(spec=dataclasses.replace(job.spec, declared_format=None, inputs=inputs),
                    artifact=artifact, out_dir=job.out_dir, fmt=fmt, report=job.report,
                    parity_example=example,
                    inputs_from_signature=bool(inputs) and not job.spec.inputs)
        _dispatch(inner, chosen)


def _format_of(view: IO[bytes], chosen: mlflow_model.Plan) -> ArtifactFormat:
    if chosen.serialization == "skops":  # a zip of its own; never refined as a torch one
        size = view.seek(0, os.SEEK_END)
        view.seek(0)
        fmt = detect_prefix(view.read(PREFIX_BYTES), size)
    else:
        fmt = detect(view)
    view.seek(0)
    if chosen.flavor == "xgboost":
        expected = _XGBOOST_FORMATS
        if fmt is ArtifactFormat.UNKNOWN:
            raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                              f"{chosen.member} ({chosen.via}, model_format "
                              f"{chosen.serialization}) is neither XGBoost UBJ nor JSON: it is "
                              "XGBoost's old binary format, which xgboost removed in 3.1 (the "
                              "sandbox has 3.2), or no model at all; re-save it as UBJ with "
                              "xgboost 3.0 or earlier")
    else:
        expected = _EXPECTED[(chosen.flavor, chosen.serialization)]
    if fmt not in expected:
        raise WorkerError(WorkerExit.FORMAT_MISMATCH,
                          f"{chosen.member} should be {chosen.flavor} {chosen.serialization} "
                          f"({chosen.via}), but its bytes are {fmt.value}")
    return fmt


def _dispatch(job: Job, chosen: mlflow_model.Plan) -> None:
    if job.spec.mode is JobMode.EXTRACT_WEIGHTS and not (
            chosen.flavor in ("sklearn", "lightgbm") and chosen.serialization != "skops"):
        raise WorkerError(WorkerExit.UNSUPPORTED_MODEL,
                          f"an MLflow {chosen.flavor} {chosen.serialization} model is not read "
                          "a second time (only pickled scikit-learn and LightGBM models are)")
    if chosen.flavor == "xgboost" or (chosen.flavor, chosen.serialization) == ("lightgbm",
                                                                               "text"):
        from . import booster_convert

        booster_convert.convert(job)
    elif chosen.flavor == "onnx":
        from . import passthrough

        passthrough.convert_onnx(job)
    elif chosen.flavor in ("sklearn", "lightgbm") and chosen.serialization == "skops":
        from . import sklearn_convert

        sklearn_convert.convert_skops(job)
    elif chosen.flavor in ("sklearn", "lightgbm"):
        from . import sklearn_convert

        if job.spec.mode is JobMode.EXTRACT_WEIGHTS:
            sklearn_convert.verify(job)
        else:
            sklearn_convert.convert(job)
    elif chosen.serialization == "pt2":
        from . import torch_convert

        torch_convert.convert_exported(job)
    else:
        from . import torch_convert

        torch_convert.convert_checkpoint(job)


