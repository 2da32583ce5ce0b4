"""Conversions between the generated protobuf types and the broker's own dataclasses.

Generated code stays at this edge: nothing past it sees a protobuf message.
"""

from __future__ import annotations

import math
import re
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.api.claims import claims, report_message
from airlock_broker.conversion.format_decision import check_flavor_hint, check_serialization_hint
from airlock_broker.conversion.integrity import Assurance
from airlock_broker.conversion.jobs import JobRequest, JobResult
from airlock_broker.errors import ERROR_DOMAIN, AirlockError, Reason, error
from airlock_sandbox.contract import (
    DEFAULT_INPUT_DTYPE,
    MAX_DIMS,
    MAX_INPUTS,
    LoadingPolicy,
    OutputFormat,
    SampleTooLarge,
    Target,
    TensorSpec,
    check_parity_tolerance,
    check_sample,
    input_name,
)

#: A registry version, URI or path fits; a subject is a name, not a document.
MAX_SUBJECT = 1024
MAX_DIM = 2**31
_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")
DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64",
                    "uint8", "bool", "string"})

DECLARED: dict[pb.ArtifactFormat.ValueType, str] = {
    pb.ARTIFACT_FORMAT_PICKLE: "pickle",
    pb.ARTIFACT_FORMAT_CLOUDPICKLE: "cloudpickle",
    pb.ARTIFACT_FORMAT_JOBLIB: "joblib",
    pb.ARTIFACT_FORMAT_PYTORCH: "pytorch",
    pb.ARTIFACT_FORMAT_TORCHSCRIPT: "torchscript",
    pb.ARTIFACT_FORMAT_TORCH_EXPORT: "torch_export",
    pb.ARTIFACT_FORMAT_NUMPY: "numpy",
    pb.ARTIFACT_FORMAT_ONNX: "onnx",
    pb.ARTIFACT_FORMAT_SAFETENSORS: "safetensors",
    pb.ARTIFACT_FORMAT_MLFLOW: "mlflow",
    pb.ARTIFACT_FORMAT_JSON: "json",
    pb.ARTIFACT_FORMAT_TEXT: "text",
    pb.ARTIFACT_FORMAT_SENTENCEPIECE: "sentencepiece",
    pb.ARTIFACT_FORMAT_SKOPS: "skops",
}
TARGETS: dict[pb.TargetFormat.ValueType, Target] = {
    pb.TARGET_FORMAT_UNSPECIFIED: Target.AUTO,
    pb.TARGET_FORMAT_AUTO: Target.AUTO,
    pb.TARGET_FORMAT_ONNX: Target.ONNX,
    pb.TARGET_FORMAT_SAFETENSORS: Target.SAFETENSORS,
    pb.TARGET_FORMAT_DATA: Target.DATA,
}
POLICIES: dict[pb.LoadingPolicy.ValueType, LoadingPolicy] = {
    pb.LOADING_POLICY_UNSPECIFIED: LoadingPolicy.ALLOW_CODE,
    pb.LOADING_POLICY_ALLOW_CODE: LoadingPolicy.ALLOW_CODE,
    pb.LOADING_POLICY_SAFE_ONLY: LoadingPolicy.SAFE_ONLY,
}
_POLICY_TO_PB = {v: k for k, v in POLICIES.items() if k != pb.LOADING_POLICY_UNSPECIFIED}
_OUTPUT_TO_PB = {OutputFormat.ONNX: pb.TARGET_FORMAT_ONNX,
                 OutputFormat.SAFETENSORS: pb.TARGET_FORMAT_SAFETENSORS,
                 OutputFormat.DATA: pb.TARGET_FORMAT_DATA}


def job_request(meta: pb.ConvertMetadata, job_id: str, *, default_deadline: float,
                max_deadline: float) -> JobRequest:
    """Check a request's metadata and turn it into a ``JobRequest``."""
    declared: str | None = None
    if meta.declared_format != pb.ARTIFACT_FORMAT_UNSPECIFIED:
        if meta.declared_format not in DECLARED:
            raise error(Reason.BAD_REQUEST, f"unknown declared_format {meta.declared_format}")
        declared = DECLARED[meta.declared_format]
    if meta.target not in TARGETS:
        raise error(Reason.BAD_REQUEST, f"unknown target {meta.target}")
    if meta.loading_policy not in POLICIES:
        raise error(Reason.BAD_REQUEST, f"unknown loading_policy {meta.loading_policy}")
    if len(meta.idempotency_key) > 128:
        raise error(Reason.BAD_REQUEST, "idempotency_key is longer than 128 characters")
    deadline = float(meta.timeout_seconds) if meta.timeout_seconds else default_deadline
    return JobRequest(
        job_id=job_id,
        declared_format=declared,
        target=TARGETS[meta.target],
        policy=POLICIES[meta.loading_policy],
        inputs=tensor_specs(meta.inputs),
        deadline_seconds=min(deadline, max_deadline),
        subject=subject(meta.subject),
        mlflow_flavor=(flavor := check_flavor_hint(declared, meta.mlflow_flavor)),
        mlflow_serialization=check_serialization_hint(flavor, meta.mlflow_serialization),
        parity_tolerance=parity_tolerance(meta.parity_tolerance),
        keep_training_state=meta.keep_training_state,
        sample_input=sample_input(meta.sample_input),
    )


def parity_tolerance(value: float) -> float:
    try:
        return check_parity_tolerance(value)
    except ValueError as exc:
        raise error(Reason.BAD_REQUEST, str(exc)) from None


def sample_input(data: bytes) -> bytes:
    """The caller's parity sample, checked for size and magic only: the bytes are handed to
    the sandbox as a file and parsed there alone (contract.check_sample)."""
    if not data:
        return b""
    try:
        return check_sample(bytes(data))
    except SampleTooLarge as exc:
        raise error(Reason.SAMPLE_TOO_LARGE, str(exc)) from None
    except ValueError as exc:
        raise error(Reason.SAMPLE_INVALID, str(exc)) from None


def subject(text: str) -> str:
    """The caller's name for the artifact, as it will be signed: bounded and printable.

    Refused rather than escaped here, so that what a verifier compares is exactly what the
    caller sent (the client escapes, see ``airlock_client.provenance.escape_subject``).
    """
    if len(text) > MAX_SUBJECT:
        raise error(Reason.BAD_REQUEST, f"the subject has {len(text)} characters; at most "
                                        f"{MAX_SUBJECT} are allowed")
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        raise error(Reason.BAD_REQUEST, f"the subject holds U+{ord(bad):04X}, which is not "
                                        "printable; escape it (escape_subject in the client)")
    return text


def tensor_specs(specs: Any) -> tuple[TensorSpec, ...]:
    if len(specs) > MAX_INPUTS:
        raise error(Reason.BAD_REQUEST, f"at most {MAX_INPUTS} inputs may be described")
    out = []
    for i, spec in enumerate(specs):
        name = input_name(spec.name, i, len(specs))
        if not _NAME.fullmatch(name):
            raise error(Reason.BAD_REQUEST, f"input name {name[:40]!r} is not allowed")
        dtype = spec.dtype or DEFAULT_INPUT_DTYPE
        if dtype not in DTYPES:
            raise error(Reason.BAD_REQUEST, f"input dtype {dtype[:20]!r} is not one of "
                                            f"{', '.join(sorted(DTYPES))}")
        shape = tuple(int(d) for d in spec.shape)
        if not shape or len(shape) > MAX_DIMS or any(d < -1 or d > MAX_DIM for d in shape):
            raise error(Reason.BAD_REQUEST, f"input {name}: shape must have 1..{MAX_DIMS} dims, "
                                            "each -1 (free) or a size")
        if math.prod(max(d, 1) for d in shape) > 2**28:
            raise error(Reason.BAD_REQUEST, f"input {name}: example shape is too large")
        out.append(TensorSpec(name=name, dtype=dtype, shape=shape))
    return tuple(out)


def result_message(result: JobResult, provenance: bytes = b"") -> pb.ConvertResponse:
    msg = pb.ConvertResult(
        job_id=result.job_id,
        detected_format=result.reported_format or result.detected_format.value,
        output_format=_OUTPUT_TO_PB[result.output.format],
        input_sha256=result.input_sha256,
        input_size=result.input_size,
        output_sha256=result.output.sha256,
        output_size=result.output.size,
        assurance=(pb.ASSURANCE_INTEGRITY_VERIFIED
                   if result.assurance is Assurance.INTEGRITY_VERIFIED
                   else pb.ASSURANCE_FORMAT_SAFE_ONLY),
        loading_policy=_POLICY_TO_PB[result.policy],
        duration_seconds=result.duration_seconds,
        image_id=result.outcome.image_id,
        runtime=result.outcome.runtime,
        integrity_note=result.integrity_note,
        report=report_message(claims(result.report)),
        provenance=provenance,
    )
    # The broker's own judgement, not the report's claim (see jobs.executed_artifact_code).
    msg.report.executed_artifact_code = result.executed_artifact_code
    return pb.ConvertResponse(result=msg)


def status_of(exc: AirlockError, job_id: str) -> status_pb2.Status:
    """A ``google.rpc.Status`` carrying an ``ErrorInfo`` with the reason, and for a refusal
    worth retrying later the standard ``RetryInfo`` with the broker's estimate of the wait
    (the queue it saw goes in the ErrorInfo's metadata as ``queued``)."""
    metadata = {"job_id": job_id, "kind": exc.kind.value}
    if exc.retry_after is not None:
        metadata["queued"] = str(exc.retry_after.queued)
    info = error_details_pb2.ErrorInfo(reason=str(exc.reason), domain=ERROR_DOMAIN,
                                       metadata=metadata)
    details = [_packed(info)]
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after.seconds * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=exc.status.value[0], message=exc.message, details=details)


def _packed(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail
