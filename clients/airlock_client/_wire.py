"""Protobuf <-> the client's dataclasses. Generated types never leave this module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock_client._errors import (
    AccessDenied,
    AirlockError,
    ConversionError,
    ServiceUnavailable,
)
from airlock_client._types import (
    Assurance,
    ConversionReport,
    ConversionResult,
    DeclaredFormat,
    LoadingPolicy,
    ParityCheck,
    Target,
    TensorSpec,
)
from airlock_client.provenance import check_subject

TARGETS: dict[str, pb.TargetFormat.ValueType] = {
    "auto": pb.TARGET_FORMAT_AUTO,
    "onnx": pb.TARGET_FORMAT_ONNX,
    "safetensors": pb.TARGET_FORMAT_SAFETENSORS,
}
POLICIES: dict[str, pb.LoadingPolicy.ValueType] = {
    "allow_code": pb.LOADING_POLICY_ALLOW_CODE,
    "safe_only": pb.LOADING_POLICY_SAFE_ONLY,
}
DECLARED: dict[str, pb.ArtifactFormat.ValueType] = {
    "pickle": pb.ARTIFACT_FORMAT_PICKLE,
    "cloudpickle": pb.ARTIFACT_FORMAT_CLOUDPICKLE,
    "joblib": pb.ARTIFACT_FORMAT_JOBLIB,
    "pytorch": pb.ARTIFACT_FORMAT_PYTORCH,
    "torchscript": pb.ARTIFACT_FORMAT_TORCHSCRIPT,
    "torch_export": pb.ARTIFACT_FORMAT_TORCH_EXPORT,
    "numpy": pb.ARTIFACT_FORMAT_NUMPY,
    "onnx": pb.ARTIFACT_FORMAT_ONNX,
    "safetensors": pb.ARTIFACT_FORMAT_SAFETENSORS,
    "mlflow": pb.ARTIFACT_FORMAT_MLFLOW,
    "json": pb.ARTIFACT_FORMAT_JSON,
    "text": pb.ARTIFACT_FORMAT_TEXT,
    "sentencepiece": pb.ARTIFACT_FORMAT_SENTENCEPIECE,
    "skops": pb.ARTIFACT_FORMAT_SKOPS,
}
OUTPUTS: dict[pb.TargetFormat.ValueType, Literal["onnx", "safetensors", "data"]] = {
    pb.TARGET_FORMAT_ONNX: "onnx", pb.TARGET_FORMAT_SAFETENSORS: "safetensors",
    pb.TARGET_FORMAT_DATA: "data"}
_ASSURANCE = {pb.ASSURANCE_FORMAT_SAFE_ONLY: Assurance.FORMAT_SAFE_ONLY,
              pb.ASSURANCE_INTEGRITY_VERIFIED: Assurance.INTEGRITY_VERIFIED}
POLICY_NAMES = {v: k for k, v in POLICIES.items()}


def assurance(value: pb.Assurance.ValueType) -> Assurance:
    return _ASSURANCE.get(value, Assurance.UNSPECIFIED)


def metadata(*, size: int, sha256: str, target: Target, policy: LoadingPolicy,
             declared: DeclaredFormat | None, inputs: tuple[TensorSpec, ...],
             idempotency_key: str, filename: str, timeout_seconds: int,
             subject: str = "", mlflow_flavor: str = "", mlflow_serialization: str = "",
             parity_tolerance: float = 0.0, sample_input: bytes = b"",
             keep_training_state: bool = False) -> pb.ConvertRequest:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}")
    if policy not in POLICIES:
        raise ValueError(f"loading policy must be one of {sorted(POLICIES)}")
    if declared is not None and declared not in DECLARED:
        raise ValueError(f"declared format must be one of {sorted(DECLARED)}")
    check_subject(subject)
    meta = pb.ConvertMetadata(
        declared_format=DECLARED[declared] if declared else pb.ARTIFACT_FORMAT_UNSPECIFIED,
        target=TARGETS[target], loading_policy=POLICIES[policy],
        idempotency_key=idempotency_key, size_bytes=size, sha256=sha256,
        filename=filename[:255], timeout_seconds=timeout_seconds, subject=subject,
        mlflow_flavor=mlflow_flavor, mlflow_serialization=mlflow_serialization,
        parity_tolerance=float(parity_tolerance),
        keep_training_state=keep_training_state,
        sample_input=sample_input,
        inputs=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in inputs],
    )
    return pb.ConvertRequest(metadata=meta)


def result(msg: pb.ConvertResult, output: Path) -> ConversionResult:
    rep = msg.report
    report = ConversionReport(
        loader=rep.loader, converter=rep.converter,
        executed_artifact_code=rep.executed_artifact_code,
        parity=tuple(ParityCheck(p.output_name, p.samples, p.max_abs_diff, p.tolerance, p.passed,
                                 p.max_rel_diff) for p in rep.parity),
        warnings=tuple(rep.warnings), versions=dict(rep.versions),
        inputs=tuple(TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in rep.inputs),
        tensor_count=rep.tensor_count, parity_inputs=rep.parity_inputs,
    )
    if msg.output_format not in OUTPUTS:
        raise AirlockError(f"the broker returned an unknown output format {msg.output_format}")
    return ConversionResult(
        job_id=msg.job_id, output=output, format=OUTPUTS[msg.output_format],
        sha256=msg.output_sha256, size=msg.output_size, input_sha256=msg.input_sha256,
        input_size=msg.input_size, detected_format=msg.detected_format,
        assurance=assurance(msg.assurance),
        loading_policy=cast(LoadingPolicy, POLICY_NAMES.get(msg.loading_policy, "allow_code")),
        # Unsigned, the header's word alone: a number, or 0 (NaN or Infinity is no JSON).
        duration_seconds=_seconds(msg.duration_seconds) or 0.0, image_id=msg.image_id,
        runtime=msg.runtime,
        report=report, integrity_note=msg.integrity_note, replayed=msg.replayed,
        transfer=msg.transfer,
    )


def error_from_rpc(exc: grpc.RpcError) -> AirlockError:
    """Map a failed call to the client's exception tree using the ErrorInfo detail."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    reason, kind, job_id = "", "failed", ""
    retry_after: float | None = None
    queued: int | None = None
    status = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason = info.reason
                kind = info.metadata.get("kind", kind)
                job_id = info.metadata.get("job_id", "")
                queued = _count(info.metadata.get("queued", ""))
            elif detail.Unpack(retry):
                retry_after = _seconds(retry.retry_delay.ToNanoseconds() / 1e9)
    if code == grpc.StatusCode.UNAVAILABLE:
        if not reason:  # the transport's, not the broker's: nothing answered
            message = (f"no broker answered ({message or 'unavailable'}); is it running "
                       "('make serve'), and is the address right (--server, AIRLOCK_SERVER)?")
        return ServiceUnavailable(message, reason=reason or "UNAVAILABLE")
    if not reason:
        reason = code.name if code is not None else "UNKNOWN"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AccessDenied(reason, message or reason, kind="denied", code=code.name)
    return ConversionError(reason, message or reason, kind=kind, code=code.name, job_id=job_id,
                           retry_after=retry_after, queued=queued)


def _seconds(value: float) -> float | None:
    """A delay the broker asked for, or a duration it said, if it is one (the client bounds
    a delay by its deadline)."""
    return value if math.isfinite(value) and value >= 0 else None


def _count(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
