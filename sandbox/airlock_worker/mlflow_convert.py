"""MLFLOW: a packed MLflow model directory. Re-check the bundle, read ``MLmodel``, copy the
one member the flavor names into this container's private tmpfs, then hand it to the
ordinary converter for its format (sklearn_convert, torch_convert) with the MLflow signature
as the input types when the request gave none. The request's loading policy applies
unchanged: those converters gate every code-executing loader.

skops files load with skops' default trusted types only (no artifact code runs); types
outside that list are trusted only under allow_code, recorded as executed artifact code.
The ``skops_trusted_types`` list in ``MLmodel`` is the artifact's own claim and is ignored.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zipfile

from airlock_sandbox.contract import WorkerExit
from airlock_sandbox.formats import PREFIX_BYTES, ArtifactFormat, detect_prefix

from . import mlflow_model
from .detect import detect
from .errors import WorkerError
from .job import Job

#: Upper bound on a bundle's members together (the broker's artifact cap is the real one).
MAX_BUNDLE_BYTES = 8 * 1024**3
_EXPECTED = {
    ("sklearn", "pickle"): {ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB},
    ("sklearn", "cloudpickle"): {ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB},
    ("sklearn", "skops"): {ArtifactFormat.ZIP},
    ("pytorch", "pickle"): {ArtifactFormat.PYTORCH_ZIP, ArtifactFormat.PYTORCH_LEGACY},
    ("pytorch", "pt2"): {ArtifactFormat.TORCH_EXPORT},
}


def convert(job: Job) -> None:
    size = os.stat(job.artifact).st_size
    try:
        zf = zipfile.ZipFile(job.artifact)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WorkerError(WorkerExit.UNSAFE_MODEL_DIR, f"unreadable bundle: {exc}") from None
    with zf, tempfile.TemporaryDirectory(prefix="mlflow-") as scratch:
        members = mlflow_model.open_members(zf, size, MAX_BUNDLE_BYTES)
        mlmodel = mlflow_model.read_mlmodel(zf, members)
        chosen = mlflow_model.plan(mlmodel, members)
        for warning in chosen.warnings:
            job.report.warn(warning)
        inputs = job.spec.inputs or mlflow_model.signature_inputs(mlmodel, job.report.warn)
        path = _extract(zf, members[chosen.member], scratch)
        fmt = _format_of(path, chosen)
        job.report.detected_format = f"mlflow:{chosen.flavor}/{chosen.serialization}"[:32]
        inner = Job(spec=dataclasses.replace(job.spec, declared_format=None, inputs=inputs),
                    artifact=path, out_dir=job.out_dir, fmt=fmt, report=job.report)
        _dispatch(inner, chosen)


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, scratch: str) -> str:
    """Copy one checked member into the private tmpfs (noexec): a plain file, created new."""
    free = shutil.disk_usage(scratch).free
    if info.file_size > free:
        raise WorkerError(WorkerExit.CONVERSION_FAILED,
                          f"{info.filename} ({info.file_size} bytes) does not fit the sandbox's "
                          f"scratch space ({free} bytes free); raise [sandbox] tmpfs_bytes")
    path = os.path.join(scratch, mlflow_model.member_path(info.filename))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        shutil.copyfileobj(src, out, 1024 * 1024)
    return path


def _format_of(path: str, chosen: mlflow_model.Plan) -> ArtifactFormat:
    if chosen.serialization == "skops":  # a zip of its own; never refined as a torch one
        with open(path, "rb") as fh:
            fmt = detect_prefix(fh.read(PREFIX_BYTES), os.stat(path).st_size)
    else:
        fmt = detect(path)
    if fmt not in _EXPECTED[(chosen.flavor, chosen.serialization)]:
        raise WorkerError(WorkerExit.FORMAT_MISMATCH,
                          f"{chosen.member} should be {chosen.flavor} {chosen.serialization} "
                          f"({chosen.via}), but its bytes are {fmt.value}")
    return fmt


def _dispatch(job: Job, chosen: mlflow_model.Plan) -> None:
    if chosen.flavor == "sklearn" and chosen.serialization == "skops":
        _convert_skops(job)
    elif chosen.flavor == "sklearn":
        from . import sklearn_convert

        sklearn_convert.convert(job)
    elif chosen.serialization == "pt2":
        from . import torch_convert

        torch_convert.convert_exported(job)
    else:
        from . import torch_convert

        torch_convert.convert_checkpoint(job)


def _convert_skops(job: Job) -> None:
    import skops.io

    from . import sklearn_convert

    with job.loading():
        untrusted = skops.io.get_untrusted_types(file=job.artifact)
    if untrusted:
        job.allow_code(f"skops.io.load(trusting {len(untrusted)} more type(s))",
                       "the skops file names types outside skops' default trusted set: "
                       + ", ".join(str(t)[:60] for t in untrusted[:5]))
        trusted = list(untrusted)
    else:
        job.loaded_safely("skops.io.load")
        trusted = None
    with job.loading():
        model = skops.io.load(job.artifact, trusted=trusted)
    sklearn_convert.convert_object(job, model)
