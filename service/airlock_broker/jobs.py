"""One conversion job: detect, hand to a single-use sandbox, judge the outcome, validate.

The decision about a job rests only on what the broker observed: the container's exit code
and OOM flag, the broker's own deadline, and the broker's validation of the output file. The
worker's report is carried along as information (DESIGN §1.4).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock_broker.audit import AuditRecord
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.outputs import ValidatedOutput, validate_output
from airlock_broker.pools import Pools
from airlock_broker.sandbox import Outcome, SandboxBackend, SandboxUnavailable
from airlock_broker.validation.files import read_report
from airlock_broker.validation.limits import OutputLimits
from airlock_sandbox.contract import (
    MAX_REPORT_BYTES,
    JobSpec,
    LoadingPolicy,
    Target,
    TensorSpec,
    WorkerExit,
)
from airlock_sandbox.formats import ArtifactFormat, admits, detect_prefix, profile_for

log = logging.getLogger(__name__)

#: Worker exit code -> reason. Anything not listed (a crash, a signal) is CONVERSION_FAILED.
EXIT_REASONS: dict[int, Reason] = {
    WorkerExit.UNSUPPORTED_FORMAT: Reason.UNSUPPORTED_FORMAT,
    WorkerExit.FORMAT_MISMATCH: Reason.FORMAT_MISMATCH,
    WorkerExit.POLICY_VIOLATION: Reason.POLICY_VIOLATION,
    WorkerExit.UNSUPPORTED_MODEL: Reason.UNSUPPORTED_MODEL,
    WorkerExit.INPUT_SPEC_REQUIRED: Reason.INPUT_SPEC_REQUIRED,
    WorkerExit.CONVERSION_FAILED: Reason.CONVERSION_FAILED,
    WorkerExit.PARITY_FAILED: Reason.PARITY_FAILED,
    WorkerExit.OUTPUT_TOO_LARGE: Reason.OUTPUT_TOO_LARGE,
    WorkerExit.BAD_JOB_SPEC: Reason.INTERNAL,
}

_EXIT_MESSAGES: dict[Reason, str] = {
    Reason.UNSUPPORTED_FORMAT: "the sandbox did not recognise the artifact's format",
    Reason.FORMAT_MISMATCH: "the artifact is not of the declared format",
    Reason.POLICY_VIOLATION: "loading this artifact would execute its code, which the "
                             "safe_only loading policy refuses",
    Reason.UNSUPPORTED_MODEL: "the artifact loaded, but holds nothing Airlock can convert",
    Reason.INPUT_SPEC_REQUIRED: "exporting this model needs input shapes (--input-shape)",
    Reason.CONVERSION_FAILED: "the conversion failed in the sandbox",
    Reason.PARITY_FAILED: "the converted model's outputs differ from the original's",
    Reason.OUTPUT_TOO_LARGE: "the converted model exceeds the output size limit",
    Reason.INTERNAL: "the sandbox refused the broker's job spec (a broker bug)",
}

_MAX_DETAIL = 400
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class JobRequest:
    """A caller's request, already checked and converted from the wire format."""

    job_id: str
    declared_format: str | None = None
    target: Target = Target.AUTO
    policy: LoadingPolicy = LoadingPolicy.ALLOW_CODE
    inputs: tuple[TensorSpec, ...] = ()
    deadline_seconds: float = 120.0


@dataclass(frozen=True)
class JobResult:
    """A converted, validated output and what is known about how it was made."""

    job_id: str
    detected_format: ArtifactFormat
    input_sha256: str
    input_size: int
    output: ValidatedOutput
    outcome: Outcome
    policy: LoadingPolicy
    report: dict[str, Any] = field(default_factory=dict)
    duration_seconds: float = 0.0


def detect_on_host(prefix: bytes, size: int, declared: str | None) -> ArtifactFormat:
    """Coarse detection by magic bytes (the worker refines zips); rejects before any sandbox."""
    detected = detect_prefix(prefix, size)
    if detected is ArtifactFormat.UNKNOWN:
        raise error(Reason.UNSUPPORTED_FORMAT,
                    "the artifact's leading bytes match no supported format (pickle, joblib, "
                    "PyTorch, numpy, ONNX, safetensors)")
    if declared is not None and not admits(declared, detected):
        raise error(Reason.FORMAT_MISMATCH,
                    f"declared {declared}, but the leading bytes say {detected}")
    return detected


def sanitize(text: object, limit: int = _MAX_DETAIL) -> str:
    """Hostile text from the sandbox, made safe to show: printable ASCII, capped."""
    flat = _UNPRINTABLE.sub("?", str(text))
    return flat if len(flat) <= limit else flat[:limit] + "..."


def judge(outcome: Outcome, report: dict[str, Any] | None, deadline: float) -> None:
    """Raise the reason a finished sandbox failed, or return if it exited 0."""
    if outcome.timed_out:
        raise error(Reason.SANDBOX_TIMEOUT,
                    f"the sandbox did not finish within {deadline:g} s and was killed")
    if outcome.oom_killed:
        raise error(Reason.SANDBOX_OOM, "the sandbox ran out of memory and was killed")
    code = outcome.exit_code
    if code == WorkerExit.OK:
        return
    reason = EXIT_REASONS.get(code if code is not None else -1, Reason.CONVERSION_FAILED)
    message = _EXIT_MESSAGES.get(reason) or f"the sandbox exited with code {code}"
    if reason is Reason.CONVERSION_FAILED and code not in EXIT_REASONS:
        message = f"the sandbox exited with code {code}"
    detail = (report or {}).get("error")
    if detail:
        message += f" (sandbox said, unverified: {sanitize(detail)})"
    raise error(reason, message)


class JobRunner:
    """Runs jobs on single-use slots from the pools. Owns nothing between jobs."""

    def __init__(self, backend: SandboxBackend, pools: Pools, limits: OutputLimits) -> None:
        self.backend = backend
        self.pools = pools
        self.limits = limits

    @contextlib.asynccontextmanager
    async def run(self, request: JobRequest, upload: Path, detected: ArtifactFormat,
                  input_sha256: str, input_size: int,
                  audit: AuditRecord) -> AsyncIterator[JobResult]:
        """Convert ``upload``; yields the validated result, destroys the sandbox on exit."""
        began = time.monotonic()
        slot = await self.pools.acquire(profile_for(detected))
        audit.set(warm_container=slot.started, profile=slot.profile)
        try:
            slot.workspace.adopt_artifact(upload)
            spec = JobSpec(job_id=request.job_id, target=request.target, policy=request.policy,
                           declared_format=request.declared_format, inputs=request.inputs,
                           max_output_bytes=self.limits.max_output_bytes)
            try:
                outcome = await self.backend.run(slot, spec, request.deadline_seconds)
            except SandboxUnavailable as exc:
                raise error(Reason.SANDBOX_UNAVAILABLE, str(exc)) from exc
            audit.set(exit_code=outcome.exit_code, oom_killed=outcome.oom_killed,
                      timed_out=outcome.timed_out, image_id=outcome.image_id,
                      runtime=outcome.runtime,
                      sandbox_seconds=round(outcome.duration_seconds, 3))
            # From here on the container is dead: only now is its output looked at.
            report = read_report(slot.workspace.out_dir, MAX_REPORT_BYTES)
            if report is not None:
                audit.set(executed_artifact_code=report.get("executed_artifact_code") is True,
                          loader=sanitize(report.get("loader", ""), 80),
                          refined_format=sanitize(report.get("detected_format", ""), 32))
            judge(outcome, report, request.deadline_seconds)
            output = await validate_output(slot.workspace.out_dir, request.target, self.limits)
            log.info("job %s converted %s -> %s in %.2fs", request.job_id, detected,
                     output.format, time.monotonic() - began,
                     extra={"job_id": request.job_id, "outcome": "ok"})
            yield JobResult(
                job_id=request.job_id, detected_format=detected, input_sha256=input_sha256,
                input_size=input_size, output=output, outcome=outcome, policy=request.policy,
                report=report or {}, duration_seconds=time.monotonic() - began)
        except AirlockError as exc:
            log.info("job %s ended: %s", request.job_id, exc,
                     extra={"job_id": request.job_id, "outcome": exc.kind.value,
                            "reason": exc.reason.value})
            raise
        finally:
            await self.pools.release(slot)
