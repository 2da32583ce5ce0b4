"""The gRPC servicer: thin. Reads the stream, admits, spools, runs the job, then answers it
(from a broker file, once the job's sandboxes are released: answers.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.answers import Answer, AnswerDrains, spool_answer
from airlock_broker.api.auth import current_principal
from airlock_broker.api.provenance import sign, statement
from airlock_broker.api.wire import job_request, result_message, status_of
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.audit import AuditLog, AuditRecord
from airlock_broker.conversion.format_decision import decide
from airlock_broker.conversion.idempotency import Claim, IdempotencyStore, options_digest
from airlock_broker.conversion.intake import IntakeLimits, read_metadata, spool_chunks
from airlock_broker.conversion.jobs import JobRunner
from airlock_broker.conversion.spool_space import SpoolSpace
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.fastpath.local_handles import LocalFiles
from airlock_broker.fastpath.local_io import spool_from_peer
from airlock_broker.fastpath.local_transfer import LocalTransferServer
from airlock_broker.ops.metrics import Metrics
from airlock_broker.sandboxes.workspace import new_upload, remove_quietly
from airlock_broker.security.keys import ALGORITHM, SigningKey

log = logging.getLogger(__name__)
_FORMAT_NAMES = {pb.TARGET_FORMAT_ONNX: "onnx", pb.TARGET_FORMAT_SAFETENSORS: "safetensors"}


class ConversionServicer(pb_grpc.ConversionServiceServicer):
    def __init__(self, config: BrokerConfig, runner: JobRunner, admission: Admission,
                 audit: AuditLog, metrics: Metrics, signing_key: SigningKey,
                 replays: IdempotencyStore, local: LocalTransferServer | None = None) -> None:
        self.config = config
        #: The same-host fast path's socket, when offered (None: streaming only).
        self.local = local
        self.signing_key = signing_key
        self.runner = runner
        self.admission = admission
        self.audit = audit
        self.metrics = metrics
        self.replays = replays
        self.intake = IntakeLimits(max_artifact_bytes=config.max_artifact_bytes,
                                   max_chunk_bytes=config.max_request_chunk_bytes,
                                   idle_seconds=config.upload_idle_seconds,
                                   upload=config.upload,
                                   space=SpoolSpace(config.spool_root, config.upload))
        self.drains = AnswerDrains(config.answer_drain_seconds)

    async def Convert(
        self, request_iterator: AsyncIterator[pb.ConvertRequest],
        context: grpc.aio.ServicerContext[pb.ConvertRequest, pb.ConvertResponse],
    ) -> AsyncIterator[pb.ConvertResponse]:
        job_id = uuid.uuid4().hex
        principal = current_principal()
        record = AuditRecord(job_id=job_id, peer=context.peer(), principal=principal.name)
        record.set(auth=principal.method, outcome="cancelled", reason=Reason.CANCELLED.value)
        # Set once the call's answer is out (or it failed): the job's dead sandboxes are
        # destroyed and replaced only then, so that neither competes with the answer.
        answered = asyncio.Event()
        try:
            # The place is held until the answer is sent: it bounds the spool files
            # (uploads, then answers) a caller can make the broker hold. The run slot and the
            # sandboxes are already free by then (answers.py).
            async with self.admission.admit(principal.name):
                answer = await self._convert(job_id, request_iterator, record, answered)
                with answer, self.drains.deadline(context,
                                                  lambda: self._unread(answer, record)):
                    async for response in answer.responses(self.config.chunk_bytes, self.intake):
                        yield response
            record.set(outcome="ok", reason=None)
        except AirlockError as exc:
            record.set(outcome=exc.kind.value, reason=exc.reason.value, message=exc.message)
            await context.abort_with_status(rpc_status.to_status(status_of(exc, job_id)))
        except Exception:
            log.exception("job %s: unexpected error", job_id, extra={"job_id": job_id})
            bug = error(Reason.INTERNAL, f"internal error in job {job_id}; see the broker log")
            record.set(outcome="failed", reason=bug.reason.value)
            await context.abort_with_status(rpc_status.to_status(status_of(bug, job_id)))
        finally:
            answered.set()
            self.audit.write(record)
            doc = record.fields
            self.metrics.job_done(str(doc.get("outcome")), doc.get("reason"),
                                  time.time() - record.started)
            self.metrics.bytes_in.inc(int(doc.get("input_size") or 0))
            self.metrics.transfers.labels(str(doc.get("transfer") or "none")).inc()
            if doc.get("outcome") == "ok":
                self.metrics.bytes_out.inc(int(doc.get("output_size") or 0))

    async def GetProvenanceKey(
        self, request: pb.GetProvenanceKeyRequest,
        context: grpc.aio.ServicerContext[pb.GetProvenanceKeyRequest,
                                          pb.GetProvenanceKeyResponse],
    ) -> pb.GetProvenanceKeyResponse:
        key = self.signing_key
        return pb.GetProvenanceKeyResponse(public_key_pem=key.public_pem,
                                           fingerprint=key.fingerprint, algorithm=ALGORITHM)

    async def OpenLocalTransfer(
        self, request: pb.OpenLocalTransferRequest,
        context: grpc.aio.ServicerContext[pb.OpenLocalTransferRequest,
                                          pb.OpenLocalTransferResponse],
    ) -> pb.OpenLocalTransferResponse:
        """A ticket for the same-host fast path, bound to this caller's principal."""
        try:
            if self.local is None:
                raise error(Reason.LOCAL_TRANSFER_DISABLED,
                            "this broker does not offer the same-host fast path")
            ticket = self.local.table.issue(current_principal().name)
        except AirlockError as exc:
            await context.abort_with_status(rpc_status.to_status(status_of(exc, "")))
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        return pb.OpenLocalTransferResponse(
            ticket=ticket, socket_path=str(self.local.path),
            ttl_seconds=int(self.local.settings.ticket_ttl_seconds))

    def _unread(self, answer: Answer, record: AuditRecord) -> grpc.Status:
        """The answer's drain deadline passed: why, for the audit log and the caller."""
        exc = error(Reason.DEADLINE_EXCEEDED,
                    f"the answer ({answer.size} bytes) was not read within "
                    f"{self.drains.seconds:g} s ([broker] answer_drain_seconds); the call was "
                    "cancelled. Read the response stream as it comes; with an idempotency key, "
                    "a retry is answered without converting again")
        record.set(outcome=exc.kind.value, reason=exc.reason.value, message=exc.message)
        log.warning("job %s: %s", record.job_id, exc.message, extra={"job_id": record.job_id})
        return rpc_status.to_status(status_of(exc, record.job_id))

    async def _convert(self, job_id: str, stream: AsyncIterator[pb.ConvertRequest],
                       record: AuditRecord, answered: asyncio.Event) -> Answer:
        meta = await read_metadata(stream, self.intake)
        record.set(idempotency_key=meta.idempotency_key, filename=meta.filename,
                   declared_size=meta.size_bytes,
                   transfer="local" if meta.local_handle else "stream")
        local = self._claim(meta.local_handle, record)
        try:
            answer = await self._convert_claimed(job_id, meta, stream, record, local, answered)
        except BaseException:
            if local is not None:
                local.close()
            raise
        answer.local = local  # the caller's descriptors are the answer's from here
        return answer

    def _claim(self, ticket: str, record: AuditRecord) -> LocalFiles | None:
        """The descriptors attached to ``ticket`` (owned by the caller from here), or None."""
        if not ticket:
            return None
        if self.local is None:
            raise error(Reason.LOCAL_TRANSFER_DISABLED,
                        "this broker does not offer the same-host fast path")
        files = self.local.claim(ticket, record.principal)
        record.set(local_peer={"pid": files.peer.pid, "uid": files.peer.uid,
                               "gid": files.peer.gid})
        return files

    async def _convert_claimed(self, job_id: str, meta: pb.ConvertMetadata,
                               stream: AsyncIterator[pb.ConvertRequest], record: AuditRecord,
                               local: LocalFiles | None, answered: asyncio.Event) -> Answer:
        request = job_request(meta, job_id, default_deadline=self.config.sandbox.deadline_seconds,
                              max_deadline=self.config.max_job_seconds)
        policy = self.config.sandbox
        record.set(declared_format=request.declared_format, target=request.target.value,
                   loading_policy=request.policy.value, deadline_seconds=request.deadline_seconds,
                   subject=request.subject, mlflow_flavor=request.mlflow_flavor or "",
                   limits={"memory_bytes": policy.memory_bytes, "nano_cpus": policy.nano_cpus,
                           "pids": policy.pids_limit, "output_bytes": policy.output_bytes},
                   weakened=list(policy.weakened))
        upload, fd = new_upload(self.config.spool_root, job_id)
        answer: Answer | None = None
        try:
            if local is None:
                spooled = await spool_chunks(stream, fd, meta, self.intake)
            else:  # no Chunk follows the metadata: the input comes from the descriptor
                spooled = await spool_from_peer(local, fd, meta, self.intake)
            record.set(input_sha256=spooled.sha256, input_size=spooled.size)
            decision = decide(spooled.prefix, spooled.size, request.declared_format,
                              request.mlflow_flavor)
            detected = decision.format
            record.set(detected_format=detected.value)
            log.info("job %s: %d bytes sha256=%s detected=%s target=%s policy=%s principal=%s "
                     "transfer=%s", job_id, spooled.size, spooled.sha256[:16], detected,
                     request.target, request.policy, record.principal,
                     "local" if local else "stream", extra={"job_id": job_id})
            principal = "" if record.principal == "anonymous" else record.principal
            options = options_digest(request.declared_format, request.target.value,
                                     request.policy.value, request.inputs, request.subject,
                                     request.mlflow_flavor or "")
            async with self.replays.claim(principal, meta.idempotency_key, spooled.sha256,
                                          options, job_id) as claim:
                if claim.replay is not None:
                    return self._replay(claim, record)
                async with self.admission.run_slot(), self.runner.run(
                        request, upload, decision, spooled.sha256, spooled.size,
                        record, answered) as result:
                    record.set(output_format=result.output.format.value,
                               output_sha256=result.output.sha256,
                               output_size=result.output.size)
                    # Signed from the hash validation already computed: no extra pass over
                    # the output.
                    envelope = sign(statement(result, request, self.config.sandbox,
                                              principal=current_principal()),
                                    self.signing_key)
                    record.set(provenance_key=self.signing_key.fingerprint,
                               provenance_sha256=hashlib.sha256(envelope).hexdigest())
                    header = result_message(result, provenance=envelope)
                    # The output leaves the slot before the caller reads a byte of it: a
                    # caller that never reads must not hold a sandbox (answers.py).
                    answer = await spool_answer(self.config.spool_root, header.result,
                                                result.output)
                # The run slot is free; the sandboxes and their output tmpfs are gone.
                # Committed inside the claim, before the answer: a retry while the answer is
                # still on its way is answered from the same file.
                answer.keep(claim)
                return answer
        except BaseException:
            if answer is not None:
                answer.close()
            raise
        finally:
            remove_quietly(upload)

    def _replay(self, claim: Claim, record: AuditRecord) -> Answer:
        stored = claim.replay
        assert stored is not None
        header = pb.ConvertResult.FromString(stored.header)
        header.replayed = True
        record.set(replay_of=stored.job_id, attached=claim.waited,
                   output_format=_FORMAT_NAMES.get(header.output_format, "unknown"),
                   output_sha256=header.output_sha256,
                   output_size=header.output_size)
        self.metrics.replays.labels("in_flight" if claim.waited else "completed").inc()
        log.info("job %s: answered with the result of job %s (same idempotency key)",
                 record.job_id, stored.job_id, extra={"job_id": record.job_id})
        # Held open: eviction cannot cut the answer short. The store keeps the name.
        return Answer(result=header, fd=IdempotencyStore.open_stored(stored),
                      size=header.output_size)
