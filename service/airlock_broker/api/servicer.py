"""The gRPC servicer: thin. A Convert call is the conversion pipeline's (conversion/pipeline.py);
this reads who calls, hands the pipeline the request stream, sends the answer it yields within
the drain deadline, and maps its ``AirlockError`` to a status (wire.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api import index_attestation, wire
from airlock_broker.api.answer_drains import AnswerDrains
from airlock_broker.api.auth import current_principal
from airlock_broker.api.provenance import sign, statement
from airlock_broker.api.wire import job_request, result_message, status_of
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.answers import Answer
from airlock_broker.conversion.audit import AuditLog, AuditRecord
from airlock_broker.conversion.idempotency import IdempotencyStore
from airlock_broker.conversion.input_room import RamSpool
from airlock_broker.conversion.intake import UPLOAD_WRITERS, IntakeLimits
from airlock_broker.conversion.jobs import JobRequest, JobResult, JobRunner
from airlock_broker.conversion.pipeline import ConversionPipeline, PipelineSettings
from airlock_broker.conversion.spool_space import SpoolSpace
from airlock_broker.daemon_pool import DaemonPool
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.fastpath.local_transfer import LocalTransferServer
from airlock_broker.fastpath.peer_transfer import FastPathTickets
from airlock_broker.ops.metrics import Metrics
from airlock_broker.security.keys import ALGORITHM, SigningKey
from airlock_broker.tracing import NO_TRACE, Trace

log = logging.getLogger(__name__)


class ConversionServicer(pb_grpc.ConversionServiceServicer):
    def __init__(self, pipeline: ConversionPipeline, metrics: Metrics, signing_key: SigningKey,
                 answer_drain_seconds: float,
                 fast_path: LocalTransferServer | None = None) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.signing_key = signing_key
        self.drains = AnswerDrains(answer_drain_seconds)
        self.attestations = index_attestation.Attestations()
        #: The same-host fast path's socket, where OpenLocalTransfer's tickets are used (None:
        #: streaming only).
        self.fast_path = fast_path

    async def Convert(
        self, request_iterator: AsyncIterator[pb.ConvertRequest],
        context: grpc.aio.ServicerContext[pb.ConvertRequest, pb.ConvertResponse],
    ) -> AsyncIterator[pb.ConvertResponse]:
        trace = self.pipeline.trace
        trace.rpc()
        principal = current_principal()
        job = self.pipeline.job(principal.name, principal.method, context.peer(),
                                principal.quota)
        try:
            async with self.pipeline.convert(job, request_iterator) as answer:
                with self.drains.deadline(context, lambda: self._unread(answer, job.record)):
                    async for response in answer.responses():
                        yield response
        except AirlockError as exc:
            await context.abort_with_status(rpc_status.to_status(status_of(exc, job.id)))
        finally:
            self._count(job.record)
        trace.event("rpc.end")

    async def GetProvenanceKey(
        self, request: pb.GetProvenanceKeyRequest,
        context: grpc.aio.ServicerContext[pb.GetProvenanceKeyRequest,
                                          pb.GetProvenanceKeyResponse],
    ) -> pb.GetProvenanceKeyResponse:
        key = self.signing_key
        return pb.GetProvenanceKeyResponse(public_key_pem=key.public_pem,
                                           fingerprint=key.fingerprint, algorithm=ALGORITHM)

    async def AttestIndex(
        self, request: pb.AttestIndexRequest,
        context: grpc.aio.ServicerContext[pb.AttestIndexRequest, pb.AttestIndexResponse],
    ) -> pb.AttestIndexResponse:
        """A signed record for a sharded directory's index, checked against its shards'
        records (index_attestation.py): CPU only, in a worker thread, a bounded few at once."""
        try:
            subject = wire.subject(request.subject)
            shards = [(s.file_name, s.provenance) for s in request.shards]
            envelope = await self.attestations.attest(
                request.index, shards, subject, key=self.signing_key,
                principal=current_principal())
        except AirlockError as exc:
            await context.abort_with_status(rpc_status.to_status(status_of(exc, "")))
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        return pb.AttestIndexResponse(provenance=envelope)

    async def OpenLocalTransfer(
        self, request: pb.OpenLocalTransferRequest,
        context: grpc.aio.ServicerContext[pb.OpenLocalTransferRequest,
                                          pb.OpenLocalTransferResponse],
    ) -> pb.OpenLocalTransferResponse:
        """A ticket for the same-host fast path, bound to this caller's principal."""
        try:
            if self.fast_path is None:
                raise error(Reason.LOCAL_TRANSFER_DISABLED,
                            "this broker does not offer the same-host fast path")
            caller = current_principal()
            ticket = self.fast_path.table.issue(caller.name, uid=caller.uid,
                                                counted_as=caller.quota)
        except AirlockError as exc:
            await context.abort_with_status(rpc_status.to_status(status_of(exc, "")))
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        return pb.OpenLocalTransferResponse(
            ticket=ticket, socket_path=str(self.fast_path.path),
            ttl_seconds=int(self.fast_path.settings.ticket_ttl_seconds))

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

    def _count(self, record: AuditRecord) -> None:
        """The finished call in the metrics, from what its audit record says."""
        doc = record.fields
        self.metrics.job_done(str(doc.get("outcome")), doc.get("reason"),
                              time.time() - record.started)
        self.metrics.bytes_in.inc(int(doc.get("input_size") or 0))
        self.metrics.transfers.labels(str(doc.get("transfer") or "none")).inc()
        if "replay_of" in doc:
            self.metrics.replays.labels("in_flight" if doc.get("attached") else "completed").inc()
        if doc.get("outcome") == "ok":
            self.metrics.bytes_out.inc(int(doc.get("output_size") or 0))


@dataclass(frozen=True)
class RpcEdge:
    """What the pipeline borrows from this layer: the wire's reading of a request, and the
    signed header of a result (asked for by the call's principal)."""

    config: BrokerConfig
    key: SigningKey
    trace: Trace = NO_TRACE

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    def request(self, meta: pb.ConvertMetadata, job_id: str) -> JobRequest:
        return job_request(meta, job_id, default_deadline=self.config.sandbox.deadline_seconds,
                           max_deadline=self.config.max_job_seconds)

    def header(self, result: JobResult, request: JobRequest) -> pb.ConvertResult:
        with self.trace.span("statement"):
            doc = statement(result, request, self.config.sandbox, principal=current_principal())
        with self.trace.span("sign"):
            envelope = sign(doc, self.key)
        with self.trace.span("result_message"):
            return result_message(result, provenance=envelope).result


def conversion_servicer(config: BrokerConfig, runner: JobRunner, admission: Admission,
                        audit: AuditLog, metrics: Metrics, signing_key: SigningKey,
                        idempotency: IdempotencyStore, fast_path: LocalTransferServer | None,
                        space: SpoolSpace, trace: Trace = NO_TRACE,
                        ram: RamSpool | None = None) -> ConversionServicer:
    """The Convert service wired: its pipeline, on the broker's settings. ``space``: the
    spool's disk, which the ONNX validators' canonical files share (server.py)."""
    intake = IntakeLimits(max_artifact_bytes=config.max_artifact_bytes,
                          max_chunk_bytes=config.max_request_chunk_bytes,
                          idle_seconds=config.upload_idle_seconds, upload=config.upload,
                          space=space,
                          writers=DaemonPool(UPLOAD_WRITERS, "airlock-upload"))
    settings = PipelineSettings(spool_root=config.spool_root, intake=intake,
                                chunk_bytes=config.chunk_bytes, policy=config.sandbox,
                                ram=ram)
    tickets = None if fast_path is None else FastPathTickets(fast_path, intake, trace)
    pipeline = ConversionPipeline(settings, runner, admission, audit, idempotency,
                                  RpcEdge(config, signing_key, trace), tickets=tickets,
                                  trace=trace)
    return ConversionServicer(pipeline, metrics, signing_key, config.answer_drain_seconds,
                              fast_path)


__all__ = ["ConversionServicer", "RpcEdge", "conversion_servicer"]
