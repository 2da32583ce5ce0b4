"""One Convert call, top to bottom: admit, receive, decide the format, claim the idempotency key,
run, validate, sign, answer.

``ConversionPipeline.convert`` is the use case; the gRPC servicer (api/servicer.py) only hands
it the request stream, sends what it yields and maps its ``AirlockError`` to a status. What the
pipeline needs from the layers above it comes in as objects it is given, so that ``conversion``
never imports ``api`` or ``fastpath``: the wire's reading of a request and the signed result
header (``Edge``), and the same-host fast path's tickets (``Tickets``).

A fresh result and a stored one (an idempotent replay) differ only in where the header and the
file come from: both are an ``Answer`` (answers.py), sent over the call's ``Transfer`` by the
same code, whichever way the artifact came.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from airlock.v1 import airlock_pb2 as pb
from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.answers import Answer, StreamTransfer, Transfer, spool_answer
from airlock_broker.conversion.audit import AuditLog, AuditRecord
from airlock_broker.conversion.format_decision import Decision, decide
from airlock_broker.conversion.idempotency import Claim, IdempotencyStore, options_digest
from airlock_broker.conversion.input_room import InputRoom, RamSpool
from airlock_broker.conversion.intake import IntakeLimits, Spooled, read_metadata
from airlock_broker.conversion.jobs import JobRequest, JobResult, JobRunner
from airlock_broker.conversion.output_room import OutputRoom
from airlock_broker.conversion.spool_space import SpoolClaim, answer_bytes, canonical_bytes
from airlock_broker.conversion.upload_limits import MiB
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.sandboxes.workspace import new_upload, remove_quietly
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_sandbox.policy import SandboxPolicy

log = logging.getLogger(__name__)
_FORMAT_NAMES = {pb.TARGET_FORMAT_ONNX: "onnx", pb.TARGET_FORMAT_SAFETENSORS: "safetensors",
                 pb.TARGET_FORMAT_DATA: "data"}


class Edge(Protocol):
    """What the RPC layer lends the pipeline (api/servicer.py's ``RpcEdge``)."""

    @property
    def fingerprint(self) -> str:
        """The provenance signing key's, for the audit record."""
        ...

    def request(self, meta: pb.ConvertMetadata, job_id: str) -> JobRequest:
        """The metadata checked and read as a ``JobRequest`` (BAD_REQUEST if it is wrong)."""
        ...

    def header(self, result: JobResult, request: JobRequest) -> pb.ConvertResult:
        """The result header, carrying the output's signed provenance."""
        ...


class Tickets(Protocol):
    """The same-host fast path (fastpath/peer_transfer.py's ``FastPathTickets``)."""

    def claim(self, ticket: str, principal: str) -> Transfer:
        """The descriptors ``ticket`` holds, if it was issued to ``principal``; owned by the
        caller from here."""
        ...


@dataclass
class Job:
    """One call's job: its audit record (its id), and when its answer is out."""

    record: AuditRecord
    #: Whom its admission place counts against (``auth.Principal.quota``).
    counted_as: str
    #: Set once the call's answer is out (or it failed): the job's dead sandboxes are
    #: destroyed and replaced only then, so that neither competes with the answer.
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether its upload began (a call refused before costs its caller one message: its
    #: audit record is within a budget, audit.py).
    uploading: bool = False

    @property
    def id(self) -> str:
        return self.record.job_id


@dataclass(frozen=True)
class PipelineSettings:
    """The broker's settings that shape a call (from ``BrokerConfig``)."""

    spool_root: Path
    intake: IntakeLimits
    #: Response chunk size on the stream.
    chunk_bytes: int
    #: The sandbox policy's limits and weakenings, for the audit record.
    policy: SandboxPolicy
    #: Where each input is spooled, RAM or disk (input_room.py); None: always on disk.
    ram: RamSpool | None = None


class ConversionPipeline:
    """The Convert use case, shared by every call; a call's state is its ``Job``."""

    def __init__(self, settings: PipelineSettings, runner: JobRunner, admission: Admission,
                 audit: AuditLog, idempotency: IdempotencyStore, edge: Edge, *,
                 tickets: Tickets | None = None, trace: Trace = NO_TRACE) -> None:
        self.settings = settings
        self.runner = runner
        self.admission = admission
        self.audit = audit
        self.idempotency = idempotency
        self.edge = edge
        #: The same-host fast path, when offered (None: streaming only).
        self.tickets = tickets
        self.trace = trace

    def job(self, principal: str, auth: str, peer: str, counted_as: str = "") -> Job:
        """A new job for ``principal`` (authenticated by ``auth``), calling from ``peer``;
        its place counts against ``counted_as`` (default: the principal)."""
        record = AuditRecord(job_id=uuid.uuid4().hex, peer=peer, principal=principal)
        record.set(auth=auth, outcome="cancelled", reason=Reason.CANCELLED.value)
        return Job(record, counted_as or principal)

    @contextlib.asynccontextmanager
    async def convert(self, job: Job,
                      requests: AsyncIterator[pb.ConvertRequest]) -> AsyncIterator[Answer]:
        """The job's answer, to send inside this block (``answer.responses()``); on exit
        everything the call held is released and its audit record written. Failures leave as
        ``AirlockError`` (an unexpected one as INTERNAL, logged), with their reason recorded."""
        record = job.record
        try:
            # The place is held until the answer is sent: it bounds the spool files (uploads,
            # then answers) a caller can make the broker hold. The run slot and the sandboxes
            # are already free by then (answers.py).
            async with self.admission.admit(job.counted_as):
                with self.trace.span("metadata"):
                    meta = await read_metadata(requests, self.settings.intake)
                record.set(idempotency_key=meta.idempotency_key, filename=meta.filename,
                           declared_size=meta.size_bytes,
                           transfer="local" if meta.local_handle else "stream")
                with (contextlib.closing(self._transfer(meta, requests, record)) as transfer,
                      await self._answer(job, meta, transfer) as answer):
                    yield answer
            record.set(outcome="ok", reason=None)
        except AirlockError as exc:
            record.set(outcome=exc.kind.value, reason=exc.reason.value, message=exc.message)
            raise
        except Exception as exc:
            log.exception("job %s: unexpected error", job.id, extra={"job_id": job.id})
            bug = error(Reason.INTERNAL, f"internal error in job {job.id}; see the broker log")
            record.set(outcome="failed", reason=bug.reason.value)
            raise bug from exc
        finally:
            job.answered.set()
            with self.trace.span("audit"):
                self.audit.write(record, before_upload=not job.uploading,
                                 caller=job.counted_as)

    def _transfer(self, meta: pb.ConvertMetadata, requests: AsyncIterator[pb.ConvertRequest],
                  record: AuditRecord) -> Transfer:
        """How this call's bytes travel: its stream, or the descriptors its ticket holds."""
        if not meta.local_handle:
            return StreamTransfer(requests, self.settings.intake, self.settings.chunk_bytes)
        if self.tickets is None:
            raise error(Reason.LOCAL_TRANSFER_DISABLED,
                        "this broker does not offer the same-host fast path")
        transfer = self.tickets.claim(meta.local_handle, record.principal)
        record.set(local_peer=transfer.peer)
        return transfer

    async def _answer(self, job: Job, meta: pb.ConvertMetadata, transfer: Transfer) -> Answer:
        """Receive the artifact, then answer it: from the idempotency store, or by converting."""
        request = self._request(job, meta)
        room: SpoolClaim | None = None
        canonical: SpoolClaim | None = None
        writing: asyncio.Future[None] | None = None
        spooled: Spooled | None = None
        inputs = self._input_room(meta, job.counted_as)
        try:
            upload, fd = new_upload(inputs.root, job.id)
        except BaseException:
            inputs.release()
            raise
        job.record.set(input_room=inputs.record())
        job.uploading = True
        try:
            with self.trace.span("spool"):
                try:
                    spooled = await transfer.receive(fd, meta, in_ram=inputs.ram,
                                                     owner=job.counted_as)
                finally:  # written (or not): what it holds counts as the tmpfs's own
                    inputs.written()
            spooled.digest.when_known(lambda sha: job.record.set(input_sha256=sha))
            if meta.sha256:  # declared: a mismatch is refused before any sandbox starts
                await spooled.digest.value()
            # Room for the answer, before any sandbox starts: a job whose output would take
            # the spool below its reserve is refused now, with the numbers (spool_space.py).
            # Estimated from the input's data: its zeros are holes on disk, written in RAM.
            occupied = spooled.data_bytes
            output_room = self.runner.rooms.for_job(request.target, occupied)
            room = self._spool_room(request, output_room, occupied)
            decision = self._decide(job, request, spooled, transfer)
            request = replace(request, target=decision.target_for(request.target))
            job.record.set(target=request.target.value)
            principal = "" if job.record.principal == "anonymous" else job.record.principal
            options = options_digest(request.declared_format, request.target.value,
                                     request.policy.value, request.inputs, request.subject,
                                     request.mlflow_flavor or "", request.parity_tolerance,
                                     # only when given: keys stored without them still match
                                     *filter(None, [request.sample_sha256,
                                                    request.keep_training_state,
                                                    request.mlflow_serialization]))
            async with self.idempotency.claim(principal, meta.idempotency_key, spooled.digest,
                                              options, job.id) as claim:
                if claim.stored is not None:
                    return self._stored(claim, job.record, transfer)
                # Only a job that converts writes a canonical copy: a replay claims none.
                canonical = self._canonical_room(request, output_room, occupied)
                output_room = replace(output_room, canonical=canonical)
                answer = await self._converted(job, request, upload, decision, spooled, claim,
                                               transfer, output_room, inputs, room)
                writing = claim.writing
                return answer
        except BaseException as exc:
            if spooled is not None and not isinstance(exc, AirlockError):
                spooled.digest.close()  # a cancelled call: its input's hash is not needed
            raise
        finally:
            if canonical is not None:  # given back once the output was validated, if it ran
                canonical.release()
            inputs.release()  # its caller's share of the RAM spool (input_room.py)
            remove_quietly(upload)  # the hash, if still running, reads its own descriptor
            if room is not None:
                # The store's copy of a delivered answer is written after it: its room is
                # held until then (the spool's reserve sees it).
                if writing is not None:
                    writing.add_done_callback(lambda _: room.release())
                else:
                    room.release()
            if spooled is not None:
                try:  # a refused artifact's audit record names it too: its hash ends first
                    await spooled.digest.settled()
                finally:  # (cancelled meanwhile: it stops at its next step)
                    spooled.digest.close()

    def _input_room(self, meta: pb.ConvertMetadata, owner: str) -> InputRoom:
        """Where the input is spooled: in RAM when its declared size fits the RAM spool and
        ``owner``'s share of it, else on disk (input_room.py)."""
        declared = meta.size_bytes
        ram = self.settings.ram
        if ram is None:
            return InputRoom(self.settings.spool_root, ram=False, bytes=declared, why="off")
        return ram.room(declared, owner=owner)

    def _spool_room(self, request: JobRequest, output: OutputRoom,
                    occupied: int) -> SpoolClaim | None:
        """The spool's room for this job's answer (None: not accounted), estimated from the
        spooled input's data: what it occupies, at most its size. Zero weights held as holes
        do come back written: the answer is claimed at its real size before it is written
        (answers.spool_answer), and refused then if it does not fit. With disk-backed
        outputs, theirs too: about as much again for each of the job's two sandboxes."""
        answer = answer_bytes(occupied, request.target, output.limits)
        if not output.disk_bytes:
            return self.settings.intake.claim(
                answer, f"this job's output (about its input's {_mib(occupied)} of data)")
        return self.settings.intake.claim(
            3 * answer, f"this job's output and its two sandboxes' disk-backed outputs (each "
                        f"about its input's {_mib(occupied)} of data)")

    def _canonical_room(self, request: JobRequest, output: OutputRoom,
                        occupied: int) -> SpoolClaim | None:
        """The spool's room for the canonical copy of an ONNX output (None: not accounted, or
        the job's output cannot be ONNX), claimed beside its answer's before any sandbox
        starts, once the idempotency store has no answer for it (a replay writes no copy):
        its validator's bytes are written there until the job is answered
        (validation/onnx_canonical.py), about the answer's size again. A job whose spool has
        room for its answer and not for that copy is refused now, not after its conversion."""
        size = canonical_bytes(occupied, request.target, output.limits)
        if not size:
            return None
        return self.settings.intake.claim(
            size, f"this job's ONNX output's canonical copy (about its input's "
                  f"{_mib(occupied)} of data, at most [output] max_onnx_bytes)")

    def _request(self, job: Job, meta: pb.ConvertMetadata) -> JobRequest:
        if self.trace:
            self.trace.event("job", {"job_id": job.id})
        request = self.edge.request(meta, job.id)
        policy = self.settings.policy
        job.record.set(
            declared_format=request.declared_format, target=request.target.value,
            loading_policy=request.policy.value, deadline_seconds=request.deadline_seconds,
            subject=request.subject, mlflow_flavor=request.mlflow_flavor or "",
            mlflow_serialization=request.mlflow_serialization or "",
            parity_tolerance=request.parity_tolerance,
            keep_training_state=request.keep_training_state,
            sample_input=request.sample_record(),
            limits={"memory_bytes": policy.memory_bytes, "nano_cpus": policy.nano_cpus,
                    "pids": policy.pids_limit, "output_bytes": policy.output_bytes},
            weakened=list(policy.weakened))
        return request

    def _decide(self, job: Job, request: JobRequest, spooled: Spooled,
                transfer: Transfer) -> Decision:
        record = job.record
        record.set(input_size=spooled.size)
        decision = decide(spooled.prefix, spooled.size, request.declared_format,
                          request.mlflow_flavor, request.mlflow_serialization)
        record.set(detected_format=decision.format.value)
        log.info("job %s: %d bytes sha256=%s detected=%s target=%s policy=%s principal=%s "
                 "transfer=%s", job.id, spooled.size, spooled.digest.hex_or_pending[:16],
                 decision.format,
                 request.target, request.policy, record.principal, transfer.name,
                 extra={"job_id": job.id})
        return decision

    async def _converted(self, job: Job, request: JobRequest, upload: Path, decision: Decision,
                         spooled: Spooled, claim: Claim, transfer: Transfer,
                         output_room: OutputRoom, inputs: InputRoom,
                         room: SpoolClaim | None) -> Answer:
        """Run the job; its signed result, spooled, is the answer (and the store's to keep).
        ``room``: the spool's room for it (``_spool_room``), claimed at its real size once
        known (answers.spool_answer)."""
        record = job.record
        answer: Answer | None = None
        try:
            async with self.admission.run_slot(), self.runner.run(
                    request, upload, decision, spooled.digest, spooled.size, record,
                    job.answered, output_room, slots_on_disk=inputs.disk_slots,
                    delivery=transfer) as result:
                if output_room.canonical is not None:
                    # Validated: its canonical bytes are on the disk (the free space says
                    # so); what the estimate held beyond them is free again.
                    output_room.canonical.release()
                record.set(output_format=result.output.format.value,
                           output_sha256=result.output.sha256, output_size=result.output.size)
                # Signed from the hash validation already computed: no extra pass over the
                # output.
                header = self.edge.header(result, request)
                record.set(provenance_key=self.edge.fingerprint,
                           provenance_sha256=hashlib.sha256(header.provenance).hexdigest())
                # The output leaves the slot before the caller reads a byte of it: a caller
                # that never reads must not hold a sandbox (answers.py).
                with self.trace.span("answer_spool"):
                    answer = await spool_answer(
                        self.settings.spool_root, header, result.output, transfer,
                        kept=claim.would_store(result.output.size), delivered=result.delivered,
                        room=room)
            # The run slot is free; the sandboxes and their output tmpfs are gone. Stored
            # inside the claim, before the answer: a retry while the answer is still on its way
            # is answered from the same file.
            with self.trace.span("answer_store"):
                answer.store(claim)
            return answer
        except BaseException:
            if answer is not None:
                answer.close()
            raise

    def _stored(self, claim: Claim, record: AuditRecord, transfer: Transfer) -> Answer:
        """The stored result of an earlier job with the same key, marked ``replayed``."""
        stored = claim.stored
        assert stored is not None
        header = pb.ConvertResult.FromString(stored.header)
        header.replayed = True
        record.set(replay_of=stored.job_id, attached=claim.waited,
                   output_format=_FORMAT_NAMES.get(header.output_format, "unknown"),
                   output_sha256=header.output_sha256, output_size=header.output_size)
        log.info("job %s: answered with the result of job %s (same idempotency key)",
                 record.job_id, stored.job_id, extra={"job_id": record.job_id})
        # Held open: eviction cannot cut the answer short. The store keeps the name.
        return Answer(result=header, fd=IdempotencyStore.open_stored(stored),
                      size=header.output_size, transfer=transfer)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"
