"""One conversion job: detect, hand to a single-use sandbox, judge the outcome, validate.

The decision about a job rests only on what the broker observed: the container's exit code
and OOM flag, the broker's own deadline, and the broker's validation of the output file. The
worker's report is carried along as information (DESIGN §1.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from airlock_broker.conversion.audit import AuditRecord
from airlock_broker.conversion.format_decision import Decision
from airlock_broker.conversion.input_digest import InputDigest
from airlock_broker.conversion.intake import SHA256_HEX
from airlock_broker.conversion.integrity import (
    CARRIED_NOTE,
    READ_ALONE_NOTE,
    Assurance,
    Extraction,
    assurance_delivering,
    digest_delivering,
)
from airlock_broker.conversion.output_room import OutputRoom, OutputRooms
from airlock_broker.conversion.output_tail import OutputTail
from airlock_broker.conversion.outputs import (
    Delivery,
    ValidatedOutput,
    compute_digest,
    validate_output,
)
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.futures import retrieved, together
from airlock_broker.hostile_text import sanitize
from airlock_broker.sandboxes.pools import Pools
from airlock_broker.sandboxes.sandbox import Outcome, SandboxBackend, SandboxUnavailable, Slot
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_broker.validation.files import read_report
from airlock_broker.validation.onnx_pool import OnnxValidatorPool
from airlock_sandbox.contract import (
    ATTRIBUTE_GLOBALS,
    MAX_REPORT_BYTES,
    OUTPUT_NAMES,
    JobMode,
    JobSpec,
    LoadingPolicy,
    OutputFormat,
    Target,
    TensorSpec,
    WorkerExit,
)
from airlock_sandbox.formats import ZIP_FAMILY, ArtifactFormat

log = logging.getLogger(__name__)

#: Worker exit code -> reason. Anything not listed (a crash, a signal) is CONVERSION_FAILED.
#: Code the artifact runs can choose the exit code, so none of these may be a reason a client
#: or ``migrate`` retries (UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL): an artifact must not
#: make itself be sent again and again (a unit test checks every code from 0 to 255).
EXIT_REASONS: dict[int, Reason] = {
    WorkerExit.UNSUPPORTED_FORMAT: Reason.UNSUPPORTED_FORMAT,
    WorkerExit.FORMAT_MISMATCH: Reason.FORMAT_MISMATCH,
    WorkerExit.POLICY_VIOLATION: Reason.POLICY_VIOLATION,
    WorkerExit.UNSUPPORTED_MODEL: Reason.UNSUPPORTED_MODEL,
    WorkerExit.INPUT_SPEC_REQUIRED: Reason.INPUT_SPEC_REQUIRED,
    WorkerExit.CONVERSION_FAILED: Reason.CONVERSION_FAILED,
    WorkerExit.PARITY_FAILED: Reason.PARITY_FAILED,
    WorkerExit.OUTPUT_TOO_LARGE: Reason.OUTPUT_TOO_LARGE,
    WorkerExit.UNSUPPORTED_FLAVOR: Reason.UNSUPPORTED_FLAVOR,
    WorkerExit.UNSAFE_MODEL_DIR: Reason.UNSAFE_MODEL_DIR,
    WorkerExit.BAD_JOB_SPEC: Reason.BAD_REQUEST,
    WorkerExit.SAMPLE_INVALID: Reason.SAMPLE_INVALID,
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
    Reason.OUTPUT_TOO_LARGE: "the converted model exceeds the job's output room ([sandbox] "
                             "output_bytes, a tmpfs counted in memory_bytes: raise both; "
                             "or, for an output larger than the input's data by a quarter, "
                             "disk_output_bytes)",
    Reason.UNSUPPORTED_FLAVOR: "the MLflow model's flavor cannot be converted (supported: "
                               "sklearn, pytorch, onnx, and pyfunc models that wrap them)",
    Reason.UNSAFE_MODEL_DIR: "the MLflow model bundle failed the sandbox's checks",
    Reason.BAD_REQUEST: "the sandbox refused the job's options (check the input specs and "
                        "the declared format)",
    Reason.SAMPLE_INVALID: "the parity sample does not fit the model's input",
}

#: Formats that under ``allow_code`` are loaded by unpickling: loading one executed artifact
#: code, whatever the worker (which that code may have taken over) reports. Under ``safe_only``
#: the policy loader reads them, which calls nothing the pickle names.
ALWAYS_EXECUTES = frozenset({ArtifactFormat.PICKLE, ArtifactFormat.JOBLIB})


@dataclass(frozen=True)
class JobRequest:
    """A caller's request, already checked and converted from the wire format."""

    job_id: str
    declared_format: str | None = None
    target: Target = Target.AUTO
    policy: LoadingPolicy = LoadingPolicy.ALLOW_CODE
    inputs: tuple[TensorSpec, ...] = ()
    deadline_seconds: float = 120.0
    #: What the caller says the artifact is (checked printable and bounded; signed, not used).
    subject: str = ""
    #: The caller's MLflow flavor hint (format_decision): picks a profile, the worker checks it.
    mlflow_flavor: str | None = None
    #: The caller's hint of how an MLflow estimator is stored (format_decision): whether its
    #: reading goes first, or runs at all.
    mlflow_serialization: str | None = None
    #: The caller's parity tolerance (contract.check_parity_tolerance); 0: the default.
    parity_tolerance: float = 0.0
    #: Keep a training checkpoint's optimizer state and other entries (JobSpec's field).
    keep_training_state: bool = False
    #: The caller's parity sample, a ``.npy`` file's bytes (contract.check_sample: size and
    #: magic only; the sandbox alone parses it); empty: none.
    sample_input: bytes = b""

    @property
    def sample_sha256(self) -> str:
        """The parity sample's sha256 ("" for none): idempotency options, audit, provenance."""
        return hashlib.sha256(self.sample_input).hexdigest() if self.sample_input else ""

    def sample_record(self) -> dict[str, Any] | None:
        """The parity sample as the audit record and the provenance name it (None: none)."""
        if not self.sample_input:
            return None
        return {"sha256": self.sample_sha256, "size": len(self.sample_input)}


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
    assurance: Assurance = Assurance.FORMAT_SAFE_ONLY
    integrity_note: str = ""
    #: Whether loading ran artifact code: see :func:`executed_artifact_code`.
    executed_artifact_code: bool = False
    #: The format shown to the caller: see :func:`refined_format`.
    reported_format: str = ""
    #: The output already is where the call's transfer delivers it (integrity.py's
    #: ``assurance_delivering``): the answer only has to say so.
    delivered: bool = False


def refined_format(detected: ArtifactFormat, report: dict[str, Any] | None) -> str:
    """The host's detection, refined by the worker's only where the host could not tell: a
    zip (within the zip family) or an MLflow bundle (its flavour, ``mlflow:...``, escaped).
    The report is the word of a sandbox that the artifact may have taken over, so it may not
    rename a pickle as safetensors."""
    claimed = str((report or {}).get("detected_format", ""))
    if detected is ArtifactFormat.ZIP:
        try:
            fmt = ArtifactFormat(claimed)
        except ValueError:
            return detected.value
        return fmt.value if fmt in ZIP_FAMILY else detected.value
    if detected is ArtifactFormat.MLFLOW and claimed.startswith(f"{detected.value}:"):
        return sanitize(claimed, 32)
    return detected.value


def executed_artifact_code(detected: ArtifactFormat, report: dict[str, Any] | None,
                           policy: LoadingPolicy = LoadingPolicy.ALLOW_CODE) -> bool:
    """True when the format is loaded by unpickling under ``policy``, else what the worker
    reports.

    The report can lie only once artifact code ran, so "yes" is always believed; "no" is
    believed except for the formats that always execute under ``allow_code``. (For numpy and
    zip files loaded under ``allow_code`` a subverted worker's "no" cannot be told from the
    truth: ``safe_only`` is the guarantee.)"""
    unpickled = detected in ALWAYS_EXECUTES and policy is LoadingPolicy.ALLOW_CODE
    return unpickled or (report or {}).get("executed_artifact_code") is True


def may_have_run_code(refused: tuple[str, ...], policy: LoadingPolicy) -> bool:
    """Whether, under ``policy``, a checkpoint whose non-executing reading refused these
    globals may have run artifact code in its conversion: under ``allow_code`` torch's
    ``weights_only`` loader refuses such a global too (or allows one of its own), and the
    converter then falls back to a full load, which runs it; code that ran there can make
    its sandbox report that none did, so that report is not believed. A tensor's
    attributes, or an ``OrderedDict``'s (``ATTRIBUTE_GLOBALS``), name no code."""
    return policy is LoadingPolicy.ALLOW_CODE and any(
        name not in ATTRIBUTE_GLOBALS for name in refused)


def _refused_sentence(reading: Extraction | None, policy: LoadingPolicy) -> str:
    """What the broker says of the globals the reading refused, when the conversion may have
    run them (``may_have_run_code``); "" otherwise. The broker's own words, from the sandbox
    that executed nothing: a subverted load reports what its payload wants."""
    if reading is None or not may_have_run_code(reading.refused, policy):
        return ""
    return (f"the artifact names {', '.join(reading.refused[:3])}, which the reading that "
            "executed nothing refused and this load, under allow_code, may have run in the "
            "sandbox")


def _naming_refused(exc: AirlockError, reading: Extraction | None,
                    policy: LoadingPolicy) -> AirlockError:
    """A failed conversion's error, with the globals the reading refused (what the artifact
    names says more about a payload than the load it subverted: "unpickled a
    builtins.int")."""
    sentence = _refused_sentence(reading, policy)
    if not sentence:
        return exc
    return error(exc.reason, f"{exc.message} ({sentence})", retry_after=exc.retry_after)


def _warning_refused(report: dict[str, Any], reading: Extraction | None,
                     policy: LoadingPolicy) -> dict[str, Any]:
    """The conversion's report with that sentence as its first warning (the answer's report
    keeps 16: the broker's own comes before the sandbox's)."""
    sentence = _refused_sentence(reading, policy)
    if not sentence:
        return report
    warnings = report.get("warnings")
    return {**report, "warnings": [sentence, *(warnings if isinstance(warnings, list) else [])]}


def judge(outcome: Outcome, report: dict[str, Any] | None, deadline: float) -> None:
    """Raise the reason a finished sandbox failed, or return if it exited 0."""
    if outcome.timed_out:
        raise error(Reason.SANDBOX_TIMEOUT,
                    f"the sandbox did not finish within {deadline:g} s and was killed")
    if outcome.oom_killed:
        raise error(Reason.SANDBOX_OOM, "the sandbox ran out of memory and was killed "
                                        "([sandbox] memory_bytes; its output tmpfs counts in it)")
    code = outcome.exit_code
    if code == WorkerExit.OK:
        return
    if outcome.killed_by:
        # The engine's own record, not an exit code (which the artifact could fake).
        raise error(Reason.SANDBOX_KILLED,
                    f"the sandbox was killed from outside the broker while the job ran "
                    f"({outcome.killed_by}; exit {code})")
    reason = EXIT_REASONS.get(code if code is not None else -1, Reason.CONVERSION_FAILED)
    message = _EXIT_MESSAGES.get(reason) or f"the sandbox exited with code {code}"
    if reason is Reason.CONVERSION_FAILED and code not in EXIT_REASONS:
        message = f"the sandbox exited with code {code}"
    detail = worker_said((report or {}).get("error"))
    if detail:
        message += f" (sandbox said, unverified: {detail})"
    raise error(reason, message)


async def _carried(output: ValidatedOutput, input_digest: InputDigest
                   ) -> tuple[Assurance, str, bool]:
    """A data file's output is accepted only as the input itself: its sandbox checked the file
    and was to write it unchanged (airlock_sandbox.data_files). Then it is the author's bytes:
    integrity-verified. It is not delivered before the answer: it is copied when answered."""
    if output.sha256 != await input_digest.value():
        raise error(Reason.OUTPUT_INVALID,
                    "the data file's output is not the input byte for byte (sha256 "
                    f"{output.sha256[:12]}... against the input's): a data file is carried "
                    "unchanged")
    return Assurance.INTEGRITY_VERIFIED, CARRIED_NOTE, False


def _outcome_fields(outcome: Outcome) -> dict[str, Any]:
    """What the audit record keeps of a finished sandbox."""
    return {"exit_code": outcome.exit_code, "oom_killed": outcome.oom_killed,
            "timed_out": outcome.timed_out, "image_id": outcome.image_id,
            "runtime": outcome.runtime, "exit_seen_by": outcome.exit_seen_by,
            "sandbox_seconds": round(outcome.duration_seconds, 3)}


def worker_said(detail: Any) -> str:
    """The sentence a failed worker's report gives (``{"exit": NAME, "message": "NAME: ..."}``)
    without the exit name the reason already says, made safe; anything else as it is, made
    safe. Its word, shown to the caller, never believed."""
    if isinstance(detail, dict):
        exit_name, text = detail.get("exit"), detail.get("message")
        if isinstance(text, str):
            if isinstance(exit_name, str) and text.startswith(f"{exit_name}: "):
                text = text[len(exit_name) + 2:]
            return sanitize(text)
    return sanitize(detail) if detail else ""


def _refused_globals(report: dict[str, Any]) -> tuple[str, ...]:
    """The globals an integrity reading says it did not call: its word, made safe, shown."""
    names = report.get("refused_globals")
    if not isinstance(names, list):
        return ()
    return tuple(sanitize(n, 120) for n in names[:10] if isinstance(n, str))


def _timings(report: dict[str, Any] | None) -> Any:
    """The worker's own timings, for the trace (its word, like the rest of the report)."""
    timings = (report or {}).get("timings")
    return timings if isinstance(timings, dict) else {}


async def _settle(task: asyncio.Task[Any]) -> None:
    """A background task of the job's, ended with the job (its result no longer matters)."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})  # the task's own outcome is not raised here; ours would be
    retrieved(task)


class JobRunner:
    """Runs jobs on single-use slots from the pools. Owns nothing between jobs."""

    def __init__(self, backend: SandboxBackend, pools: Pools, rooms: OutputRooms, *,
                 onnx_validator: OnnxValidatorPool, verify_integrity: bool = True,
                 trace: Trace = NO_TRACE) -> None:
        self.backend = backend
        self.onnx_validator = onnx_validator
        self.pools = pools
        #: Each job's output room is decided from these, once (output_room.py).
        self.rooms = rooms
        self.verify_integrity = verify_integrity
        self.trace = trace

    @contextlib.asynccontextmanager
    async def run(self, request: JobRequest, upload: Path, decision: Decision,
                  input_digest: InputDigest, input_size: int, audit: AuditRecord,
                  answered: asyncio.Event | None,
                  room: OutputRoom, *, slots_on_disk: bool = False,
                  delivery: Delivery | None = None) -> AsyncIterator[JobResult]:
        """Convert ``upload`` as ``decision`` says (format_decision: the host's one view of
        it); yields the validated result, destroys the sandboxes on exit. ``room``: where
        its sandboxes write their outputs and how much (``rooms.for_job``);
        ``slots_on_disk``: the upload is on the disk spool while warm slots are on the RAM
        spool, so the job's slots are prepared there (input_room.py).

        When the decision says integrity applies (a PyTorch checkpoint converted to
        safetensors, an estimator pickle), the artifact is also read by a sandbox that
        executes nothing it names: first, when ``Decision.reads_first`` (its output is the
        answer if it refused nothing), else beside the conversion; when both run, the two
        outputs must agree (integrity.py).
        The sandboxes are destroyed once ``answered`` is set (bounded: ``Pools.release``).
        ``delivery``: where the output may go while the two are compared (the fast path's
        caller's file); the result says whether it went (``JobResult.delivered``).
        ``input_digest``: the upload's sha256, perhaps still being computed (the fast path's,
        input_digest.py); awaited last, for the result.
        """
        began = time.monotonic()
        detected = decision.format
        audit.set(output_room={"bytes": room.limits.max_output_bytes,
                               "on_disk": bool(room.disk_bytes)})
        take = functools.partial(self._slot, on_disk=slots_on_disk)
        verify = self.verify_integrity and decision.verifies(request.target)
        async with contextlib.AsyncExitStack() as stack:
            read_first: Extraction | None = None
            reader: Slot | None = None
            if verify and decision.reads_first(bool(room.disk_bytes)):
                # An estimator pickle or a checkpoint: the reading that executes nothing goes
                # first. When it refuses nothing, its output is the answer: one sandbox, no
                # artifact code.
                reader = await take(stack, decision.integrity_profile, answered, room)
                audit.set(warm_container=reader.started, profile=reader.profile)
                await self.backend.hand_over(reader, upload, request.sample_input)
                read_first = await self._read_first(reader, request, decision, stack, room,
                                                    audit)
                if not read_first.refused and read_first.output is not None:
                    yield await self._read_result(read_first, request, input_digest,
                                                  input_size, audit, began, delivery)
                    return
            slot = await take(stack, decision.profile, answered, room)
            if reader is None:
                audit.set(warm_container=slot.started, profile=slot.profile)
                await self.backend.hand_over(slot, upload, request.sample_input)
            else:  # the reading's artifact and sample, linked
                await self.backend.hand_over(slot, reader)
            extractor = (await take(stack, decision.integrity_profile, answered, room)
                         if verify and reader is None else None)
            if extractor is not None:
                await self.backend.hand_over(extractor, slot)
            # The worker's read-back of its own output is redundant beside a reading whose
            # output the broker compares with it (JobSpec.read_back); not after one that
            # failed, which leaves nothing to compare.
            compared = extractor is not None or (read_first is not None
                                                 and read_first.output is not None)
            spec = replace(self._spec(request, detected, JobMode.CONVERT, room),
                           policy=request.policy, declared_format=request.declared_format,
                           read_back=not compared)
            # The caller's deadline is the job's: after a reading, the conversion has what
            # it left (at least a second), not a deadline of its own.
            deadline = request.deadline_seconds
            if read_first is not None:
                deadline = max(1.0, deadline - (time.monotonic() - began))
            try:
                outcome, extraction = await together(
                    self._sandbox_run("sandbox_run", slot, spec, deadline),
                    self._extract(extractor, request, detected, stack, room,
                                  digest_only=bool(room.disk_bytes),
                                  tensors=decision.reads_tensors, audit=audit))
            except SandboxUnavailable as exc:
                raise error(Reason.SANDBOX_UNAVAILABLE, str(exc)) from exc
            extraction = extraction or read_first
            audit.set(**_outcome_fields(outcome))
            # From here on the containers are dead: only now are their outputs looked at.
            out_dir = await self.backend.output(slot)
            with self.trace.span("read_report") as span:
                report = read_report(out_dir, MAX_REPORT_BYTES)
                if span:
                    span.note({"timings": _timings(report)})
            if report is not None:
                audit.set(loader=sanitize(report.get("loader", ""), 80))
            audit.set(refined_format=refined_format(detected, report))
            executed = executed_artifact_code(detected, report, request.policy) or (
                extraction is not None and may_have_run_code(extraction.refused, request.policy))
            audit.set(executed_artifact_code=executed)
            try:
                try:
                    await self._judge(outcome, report, deadline)
                except AirlockError as exc:
                    raise _naming_refused(exc, extraction, request.policy) from exc
                # With the extraction's output at hand, a safetensors output is compared with
                # it rather than hashed: when they are the same file it takes that digest.
                with self.trace.span("validate"):
                    output = await validate_output(
                        out_dir, request.target, room.limits, self.onnx_validator,
                        digest=extraction is None or extraction.output is None, kind=detected,
                        spool=room.canonical)
                stack.callback(output.close)  # an ONNX output's file: once it is answered
                if extraction is not None and extraction.data_sha256:
                    audit.set(integrity_compared="data_digest")  # not its bytes: integrity.py
                if output.format is OutputFormat.DATA:
                    assurance, note, delivered = await _carried(output, input_digest)
                else:
                    output, assurance, note, delivered = await assurance_delivering(
                        output, extraction, delivery, before_commit=input_digest.value)
                    output = await compute_digest(output)
            except AirlockError as exc:
                log.info("job %s ended: %s", request.job_id, exc,
                         extra={"job_id": request.job_id, "outcome": exc.kind.value,
                                "reason": exc.reason.value})
                raise
            audit.set(assurance=assurance, integrity_note=note)
            log.info("job %s converted %s -> %s (%s) in %.2fs", request.job_id, detected,
                     output.format, assurance, time.monotonic() - began,
                     extra={"job_id": request.job_id, "outcome": "ok"})
            yield JobResult(
                job_id=request.job_id, detected_format=detected,
                input_sha256=await input_digest.value(),
                reported_format=refined_format(detected, report),
                executed_artifact_code=executed,
                input_size=input_size, output=output, outcome=outcome, policy=request.policy,
                report=_warning_refused(report or {}, extraction, request.policy),
                duration_seconds=time.monotonic() - began,
                assurance=assurance, integrity_note=note, delivered=delivered)

    async def _read_first(self, reader: Slot, request: JobRequest, decision: Decision,
                          stack: contextlib.AsyncExitStack, room: OutputRoom,
                          audit: AuditRecord) -> Extraction:
        """The reading of an estimator pickle or a checkpoint, before any conversion.

        Returned when it converted the whole file (the answer), or when it refused a global
        under ``allow_code`` (the full load then runs and the two outputs are compared).
        A checkpoint's reading is also returned when it failed in any other way than running
        out of time or memory (``Decision.reading_settles_failures``: torch may still load
        it). Raised otherwise: an estimator's refusal under ``safe_only``, and any other
        failure of its reading. With every global it names allowed, a full load would
        unpickle the same objects and convert them the same way, so it would fail the same
        way: a second sandbox would only cost time.
        """
        try:
            reading = await self._extract(reader, request, decision.format, stack, room,
                                          tensors=decision.reads_tensors, audit=audit)
        except SandboxUnavailable as exc:
            raise error(Reason.SANDBOX_UNAVAILABLE, str(exc)) from exc
        assert reading is not None and reading.outcome is not None
        outcome = reading.outcome
        if not decision.reading_settles_failures:
            if outcome.timed_out or outcome.oom_killed:
                await self._judge(outcome, reading.report, request.deadline_seconds)
            return reading
        policy_refused = (bool(reading.refused)
                          or (outcome.exit_code == WorkerExit.POLICY_VIOLATION
                              and not outcome.timed_out and not outcome.oom_killed))
        if policy_refused and request.policy is LoadingPolicy.ALLOW_CODE:
            return reading
        if reading.refused:  # safe_only: what the model needs is not allowed
            raise error(Reason.POLICY_VIOLATION,
                        f"the pickle names {reading.refused[0]}, which the policy loader does "
                        "not allow, and the policy is safe_only (allow_code would load it in "
                        "the sandbox, executing its code)")
        await self._judge(outcome, reading.report, request.deadline_seconds)
        if reading.invalid is not None:
            raise reading.invalid
        return reading

    def _spec(self, request: JobRequest, detected: ArtifactFormat, mode: JobMode,
              room: OutputRoom) -> JobSpec:
        """What both readings of a job are asked alike (inputs, target, options), so that
        their outputs compare; the conversion adds the policy and the declaration."""
        return JobSpec(job_id=request.job_id, artifact_format=detected, target=request.target,
                       inputs=request.inputs, mode=mode,
                       max_output_bytes=room.limits.max_output_bytes,
                       mlflow_flavor=request.mlflow_flavor,
                       parity_tolerance=request.parity_tolerance,
                       keep_training_state=request.keep_training_state,
                       sample_input=bool(request.sample_input))

    async def _judge(self, outcome: Outcome, report: dict[str, Any] | None,
                     deadline: float) -> None:
        """:func:`judge`, telling the pools first when the engine itself went away."""
        try:
            judge(outcome, report, deadline)
        except AirlockError as exc:
            if outcome.killed_by or (outcome.exit_code or 0) > 128:
                await self._engine_went_away(exc)  # a stopping engine kills them all
            raise

    async def _read_result(self, reading: Extraction, request: JobRequest,
                           input_digest: InputDigest,
                           input_size: int, audit: AuditRecord, began: float,
                           delivery: Delivery | None) -> JobResult:
        """The answer of a job its reading alone converted: integrity-verified, and no
        artifact code ran (the reading's mode never executes what the artifact names).
        ``delivery`` gets the output while its digest is finished (integrity.digest_delivering).
        """
        assert reading.output is not None and reading.outcome is not None
        outcome, report = reading.outcome, reading.report
        output, delivered = await digest_delivering(reading, delivery,
                                                    before_commit=input_digest.value)
        audit.set(**_outcome_fields(outcome),
                  loader=sanitize(report.get("loader", ""), 80),
                  refined_format=refined_format(reading.format, report),
                  executed_artifact_code=False,
                  assurance=Assurance.INTEGRITY_VERIFIED, integrity_note=READ_ALONE_NOTE)
        log.info("job %s converted %s -> %s by its reading alone in %.2fs", request.job_id,
                 reading.format, output.format, time.monotonic() - began,
                 extra={"job_id": request.job_id, "outcome": "ok"})
        return JobResult(
            job_id=request.job_id, detected_format=reading.format,
            input_sha256=await input_digest.value(),
            reported_format=refined_format(reading.format, report), executed_artifact_code=False,
            input_size=input_size, output=output, outcome=outcome, policy=request.policy,
            report=report, duration_seconds=time.monotonic() - began,
            assurance=Assurance.INTEGRITY_VERIFIED, integrity_note=READ_ALONE_NOTE,
            delivered=delivered)

    async def _engine_went_away(self, killed: AirlockError) -> None:
        """A stopping engine kills its containers: then the job failed for want of an engine."""
        try:
            await self.backend.check()
        except SandboxUnavailable as exc:
            raise error(Reason.SANDBOX_UNAVAILABLE,
                        f"the sandbox engine went away during the job ({exc}); "
                        f"{killed.message}") from exc

    async def _slot(self, stack: contextlib.AsyncExitStack, profile: str,
                    answered: asyncio.Event | None, room: OutputRoom, *,
                    on_disk: bool = False) -> Slot:
        """A single-use slot whose destruction ``stack`` owns, its output as ``room`` says,
        on the disk spool if ``on_disk``."""
        with self.trace.span("acquire") as span:
            slot = await self.pools.acquire(profile, disk_output_bytes=room.disk_bytes,
                                            on_disk=on_disk)
            if span:
                span.note({"warm": bool(slot.started), "profile": slot.profile})
        stack.push_async_callback(self._release, slot, answered)
        return slot

    async def _release(self, slot: Slot, answered: asyncio.Event | None) -> None:
        with self.trace.span("release"):
            await self.pools.release(slot, answered)

    async def _sandbox_run(self, step: str, slot: Slot, spec: JobSpec,
                           deadline: float) -> Outcome:
        """``backend.run``, traced as ``step``: the job's own, or the integrity extraction's."""
        with self.trace.span(step) as span:
            outcome = await self.backend.run(slot, spec, deadline)
            if span:
                span.note({"profile": slot.profile, "wait_s": outcome.duration_seconds,
                           "exit": outcome.exit_code})
        return outcome

    async def _extract(self, slot: Slot | None, request: JobRequest, detected: ArtifactFormat,
                       stack: contextlib.AsyncExitStack, room: OutputRoom, *,
                       digest_only: bool = False, tensors: bool = False,
                       audit: AuditRecord | None = None) -> Extraction | None:
        """Run the integrity extraction and, as soon as its sandbox is dead, validate its
        output and start hashing it: it usually ends before the conversion, so its 400 MB
        hash runs beside the conversion and the comparison instead of after them.

        ``digest_only`` (an output on disk): a checkpoint's reading reports the sha256 of its
        data section instead of writing it (JobSpec.data_digest_only), so a shard of N bytes
        costs the disk N, not 2 N; the comparison then takes the conversion's digest
        (integrity.py). A reading that wrote its data anyway is compared as a file."""
        if slot is None:
            return None
        # The reading converts as the job does (inputs, target): the outputs are compared.
        spec = replace(self._spec(request, detected, JobMode.EXTRACT_WEIGHTS, room),
                       data_digest_only=digest_only)
        tail = await self._follow(slot, room) if tensors and not digest_only else None
        if tail is not None:
            stack.push_async_callback(tail.close)
            spec = replace(spec, output_in_place=True)
            tail.start()
        outcome = await self._sandbox_run("extract_run", slot, spec, request.deadline_seconds)
        out_dir = await self.backend.output(slot)
        report = read_report(out_dir, MAX_REPORT_BYTES) or {}
        refused = _refused_globals(report)

        def seen(output: ValidatedOutput | None, note: str,
                 digest: asyncio.Task[ValidatedOutput] | None = None,
                 invalid: AirlockError | None = None, data_sha256: str = "") -> Extraction:
            return Extraction(output, note, digest, refused=refused, outcome=outcome,
                              report=report, format=detected, invalid=invalid,
                              data_sha256=data_sha256)

        if outcome.timed_out or outcome.oom_killed or outcome.exit_code != 0:
            said = worker_said(report.get("error"))
            return seen(None, "the model could not be read without executing the "
                              f"artifact (extraction exit {outcome.exit_code}"
                              f"{': ' + said if said else ''})")
        try:
            with self.trace.span("validate"):
                extracted = await validate_output(out_dir, request.target, room.limits,
                                                  self.onnx_validator, digest=False,
                                                  spool=room.canonical)
            stack.callback(extracted.close)  # an ONNX output's file: once the job is answered
        except AirlockError as exc:
            return seen(None, f"the extraction's output was invalid: {exc.message}", invalid=exc)
        data_sha256 = report.get("data_sha256")
        if digest_only and extracted.safetensors is not None and data_sha256:
            if not isinstance(data_sha256, str) or not SHA256_HEX.fullmatch(data_sha256):
                return seen(None, "the extraction reported a data digest that is not a sha256")
            return seen(extracted, "", data_sha256=data_sha256)  # its data is a hole
        digest = asyncio.create_task(self._reading_digest(extracted, tail, audit))
        stack.push_async_callback(_settle, digest)  # before the tail closes (last in, first out)
        return seen(extracted, "", digest)

    async def _reading_digest(self, output: ValidatedOutput, tail: OutputTail | None,
                              audit: AuditRecord | None) -> ValidatedOutput:
        """The reading's output with its digest, taken while it was written where it was
        followed (``tail``); the audit record says which of a safetensors output
        (``output_hashed``; an ONNX output's is of bytes in memory). Once its
        sandbox is dead; the hash's last blocks run while the output is delivered
        (integrity.digest_delivering)."""
        with self.trace.span("output_digest") as span:
            if tail is None:
                output, while_written = await compute_digest(output), False
            else:
                output, while_written = await tail.digest_of(output, await tail.finish())
            if span:
                span.note({"while_written": while_written})
        if audit is not None and output.safetensors is not None:
            audit.set(output_hashed="while_written" if while_written else "after")
        return output

    async def _follow(self, slot: Slot, room: OutputRoom) -> OutputTail | None:
        """A checkpoint's reading's safetensors output, followed and hashed as it is written
        (output_tail.py), where its sandbox can be given it append-only (under runc). Not
        an output on disk: its data is a hole there (``digest_only``)."""
        fd = await self.backend.append_only_output(slot,
                                                   OUTPUT_NAMES[OutputFormat.SAFETENSORS])
        return None if fd is None else OutputTail(fd, room.limits.max_output_bytes)
