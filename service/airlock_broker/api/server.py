"""Building and running the broker's gRPC server.

``create_server`` returns ``(server, port)`` so tests can bind port 0 in-process. ``serve``
runs until SIGINT/SIGTERM: health flips to NOT_SERVING first, jobs in flight get a grace
period, then every sandbox the broker started is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.admin import AdminServicer
from airlock_broker.api.auth import Authenticator, AuthInterceptor, server_credentials
from airlock_broker.api.local_listeners import (
    UnixListener,
    add_tcp_listeners,
    add_unix_listener,
    listener_count,
)
from airlock_broker.api.rpc_limits import (
    CallLimiter,
    OpenStreamLimiter,
    RequestArrival,
    StuckAnswers,
)
from airlock_broker.api.servicer import conversion_servicer
from airlock_broker.config import BrokerConfig
from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.audit import AuditLog
from airlock_broker.conversion.idempotency import IdempotencyStore
from airlock_broker.conversion.input_room import RamSpool
from airlock_broker.conversion.jobs import JobRunner
from airlock_broker.conversion.spool_space import SpoolSpace
from airlock_broker.conversion.upload_limits import MiB
from airlock_broker.fastpath.local_transfer import LocalTransferServer
from airlock_broker.fastpath.peer_identity import PeerTickets
from airlock_broker.ops.metrics import Metrics, MetricsInterceptor
from airlock_broker.ops.process_limits import (
    connections_per_listener,
    open_files_limit,
    raise_open_files_limit,
)
from airlock_broker.ops.selftest import SelfTestReport, run_selftest
from airlock_broker.readiness import STOPPING_WHY, Hold, Readiness
from airlock_broker.sandboxes import exit_watch
from airlock_broker.sandboxes.backends import make_backend
from airlock_broker.sandboxes.pools import Pools
from airlock_broker.sandboxes.sandbox import SandboxBackend, SandboxUnavailable
from airlock_broker.sandboxes.sandbox_ids import check_at_start
from airlock_broker.sandboxes.version_gates import Observation, host_observations
from airlock_broker.sandboxes.workspace import (
    disk_outputs_missing,
    mount_ram_spool,
    reap_stale,
    results_dir,
    unmount_ram_spool,
)
from airlock_broker.security import state_dirs
from airlock_broker.security.keys import SigningKey, SigningKeyError, load_or_create
from airlock_broker.security.uid_owners import UidOwners
from airlock_broker.tracing import NO_TRACE, Trace
from airlock_broker.validation.onnx_pool import OnnxValidatorPool

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConversionService"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
_MAX_MESSAGE = 4 * 1024 * 1024


@dataclass
class Broker:
    """A running broker and everything it owns."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    admission: Admission
    readiness: Readiness
    backend: SandboxBackend
    pools: Pools
    onnx_validator: OnnxValidatorPool
    audit: AuditLog
    idempotency: IdempotencyStore
    lock_fd: int
    signing_key: SigningKey
    #: Keeps gRPC health in step with ``readiness`` (``follow_health``) until ``stop``.
    health_follower: asyncio.Task[None] | None = None
    fast_path: LocalTransferServer | None = None
    unix: UnixListener | None = None
    #: The spool this broker reaps again when it stops (see ``stop``).
    spool_root: Path | None = None
    #: Where the job steps' events go ([observability] trace_events; off by default).
    trace: Trace = NO_TRACE
    #: The metrics endpoint's server, when ``--metrics`` asked for one.
    metrics_http: WSGIServer | None = None
    stopped: bool = False

    async def stop(self, grace: float, drain: float = 0.0) -> None:
        """Flip health, refuse new jobs, let jobs in flight finish, then release everything.

        Idempotent: a second call (a signal racing a ``finally``) must not close descriptor
        numbers that by then belong to someone else.
        """
        if self.stopped:
            return
        self.stopped = True
        self.readiness.hold(Hold.STOPPING, STOPPING_WHY)
        if self.health_follower is not None:
            self.health_follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.health_follower
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.sleep(drain)
            await self.server.stop(grace)
        finally:
            try:
                await self._release()
            finally:
                self.audit.close()
                # Whatever a cancelled job or a failed close left (an output tmpfs above all):
                # the next broker on this root would reap it, but no mount may outlive us.
                left = reap_stale(self.spool_root) if self.spool_root is not None else 0
                if left:
                    log.info("removed %d job director(ies) left at shutdown", left)
                if self.spool_root is not None:
                    unmount_ram_spool(self.spool_root)
                self.trace.close()
                os.close(self.lock_fd)

    async def _release(self) -> None:
        if self.metrics_http is not None:
            await asyncio.to_thread(self.metrics_http.shutdown)  # waits for its loop to end
            self.metrics_http.server_close()
        if self.unix is not None:
            await self.unix.close()
        if self.fast_path is not None:
            await self.fast_path.close()
        try:
            await self.pools.close()
        finally:
            await self.onnx_validator.close()
        await self.idempotency.close()
        await self.backend.close()


def lock_state(config: BrokerConfig) -> int:
    """Check the state root (``StateDirError`` if it is not the broker's alone), then take it:
    one broker per state root, since it reaps what it finds there."""
    state_dirs.prepare(config.state_root, (config.audit_path, config.provenance_key_path))
    fd = state_dirs.open_private_file(config.state_root / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SandboxUnavailable(
            f"another broker is using the state root {config.state_root}; give this one "
            "its own (--state-dir, AIRLOCK_STATE_DIR or [broker] state_root)") from None
    return fd


def provenance_key(config: BrokerConfig) -> SigningKey:
    """Load the provenance signing key, creating it on first start; say where it is."""
    path = config.provenance_key_path
    try:
        key, created = load_or_create(path)
    except OSError as exc:
        raise SigningKeyError(f"cannot create the provenance key {path}: {exc}") from exc
    if created:
        log.warning("created a new provenance signing key at %s (fingerprint %s); give "
                    "consumers its public half: airlock-broker keys export", path, key.fingerprint)
    else:
        log.info("provenance signing key %s (fingerprint %s)", path, key.fingerprint)
    return key


async def create_server(config: BrokerConfig,
                        backend: SandboxBackend | None = None) -> Broker:
    """Build, check and start a broker listening on ``config.listen`` (port 0 picks one)."""
    check_at_start(config.sandbox)  # no host account may share the sandbox's uid or gid
    if os.geteuid() == 0:  # nor the ONNX validators' (which only root can give them)
        config.onnx_validator.check_ids_unused(config.sandbox.user)
    credentials = server_credentials(config.auth)  # reads the TLS files: before taking the lock
    lock_fd = lock_state(config)  # checks the state root, where the key lives: first
    trace = NO_TRACE
    try:
        signing_key = provenance_key(config)
        stale = reap_stale(config.spool_root)  # the RAM spool's too, if one was left mounted
        if stale:
            log.info("removed %d stale job director(ies) from %s", stale, config.spool_root)
        ram = RamSpool(config.spool_root, mount_ram_spool(config.spool_root,
                                                          config.spool.ram_bytes),
                       config.spool.ram_bytes, share=config.upload.spool_share_per_caller)
        if ram.on:
            log.info("RAM spool of %d MiB at %s ([spool] ram_bytes)",
                     config.spool.ram_bytes // MiB, ram.root)
        if config.sandbox.disk_output_bytes and (missing := disk_outputs_missing()):
            log.warning("disk-backed outputs are unavailable (%s): a job whose output does not "
                        "fit [sandbox] output_bytes (%d bytes) will fail with "
                        "SANDBOX_UNAVAILABLE; install e2fsprogs and util-linux, or set "
                        "[sandbox] disk_output_bytes = 0 to refuse such outputs as too large",
                        missing, config.sandbox.output_bytes)
        if config.trace_events is not None:
            trace = Trace.to_file(config.trace_events)
            log.info("job step events go to %s ([observability] trace_events)",
                     config.trace_events)
        if backend is None:
            backend = make_backend(config.sandbox, config.spool_root,
                                   threads=4 * config.max_concurrent_jobs + 8, trace=trace)
        image_id = await backend.check()
        await backend.reap_orphans()
    except BaseException:
        trace.close()
        unmount_ram_spool(config.spool_root)
        os.close(lock_fd)
        raise
    readiness = Readiness()
    admission = Admission(config.max_concurrent_jobs, config.max_queued_jobs,
                          config.jobs_per_principal, readiness=readiness)
    pools = Pools(backend, config.pools, image_id=image_id,
                  runtime=config.sandbox.runtime, readiness=readiness)
    # The broker never parses ONNX itself. Owned from here: closed by Broker.stop, or below
    # if the rest of start-up fails.
    # The spool's disk, one account for uploads, answers and ONNX outputs' canonical bytes
    # (written by the broker as a validator sends them, never held in its memory, and
    # claimed by their job: onnx_canonical). Tests put the spool on a fake disk here.
    space = SpoolSpace(config.spool_root, config.upload)
    onnx_validator = OnnxValidatorPool(
        config.output, config.onnx_validator,
        canonical_dir=results_dir(config.spool_root))
    onnx_validator.start()
    try:
        return await _finish_server(config, backend, lock_fd, credentials, signing_key,
                                    admission, pools, onnx_validator, trace, ram, space)
    except BaseException:
        trace.close()
        await onnx_validator.close()
        unmount_ram_spool(config.spool_root)
        raise


async def _finish_server(config: BrokerConfig, backend: SandboxBackend, lock_fd: int,
                         credentials: grpc.ServerCredentials | None, signing_key: SigningKey,
                         admission: Admission, pools: Pools,
                         onnx_validator: OnnxValidatorPool, trace: Trace,
                         ram: RamSpool, space: SpoolSpace) -> Broker:
    metrics = Metrics()
    metrics.bind(admission, pools, ram)
    # gRPC's maximum_concurrent_rpcs would count a call until its stream closes, which a
    # caller that never opens its flow-control window delays for the connection's age: calls
    # are counted while their task runs instead (rpc_limits.CallLimiter), refused calls too.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        MetricsInterceptor(metrics), CallLimiter(config.rpc.max_concurrent_rpcs)]
    # After metrics, so refused calls are counted too. Always: even without [auth], the Unix
    # socket's callers are named by uid and the pools need the admin role.
    owners = UidOwners.load()  # a user's subordinate uids count as that user's
    peer_tickets = PeerTickets(owners=owners)
    interceptors.append(AuthInterceptor(Authenticator(config.auth, peer_tickets,
                                                      owners=owners)))
    interceptors.append(OpenStreamLimiter(config.rpc.max_open_streams))
    # Innermost: the methods it serves as streaming ones are guarded and counted above. An
    # answer it gives up on stays in gRPC: a peer with too many has its new calls refused.
    interceptors.append(RequestArrival(
        config.rpc.request_seconds, config.rpc.max_waiting_calls,
        StuckAnswers(config.rpc.max_stuck_answers_per_peer, config.rpc.stream_seconds)))
    # Each listener has its own count of connections: held to what the descriptors hold, a
    # flood of TCP connections never leaves the Unix socket without one to accept with.
    connections = connections_per_listener(
        config.rpc.max_connections, listener_count(config.listen, config.unix_socket),
        open_files_limit())
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        *config.rpc.server_options(connections),
    ])
    audit = AuditLog(config.audit_path)
    idempotency = IdempotencyStore(config.spool_root, config.idempotency)
    idempotency.start()
    fast_path = await _local_transfer(config, owners)
    runner = JobRunner(backend, pools, config.output_rooms, onnx_validator=onnx_validator,
                       verify_integrity=config.verify_integrity, trace=trace)
    pb_grpc.add_ConversionServiceServicer_to_server(
        conversion_servicer(config, runner, admission, audit, metrics, signing_key,
                            idempotency, fast_path, space, trace, ram),
        server)
    async def host_versions() -> dict[str, Observation]:
        return {**host_observations(), **await backend.versions()}

    async def selftest() -> SelfTestReport:
        return await run_selftest(backend, config.sandbox, host_versions=host_versions)

    async def vet_image() -> str | None:
        report = await selftest()
        return None if report.passed else "; ".join(report.failures())

    if config.selftest_on_start:  # a rebuilt image is vetted as the first one was
        pools.vet_image = vet_image

    pb_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(pools, selftest, max_concurrent_jobs=config.max_concurrent_jobs,
                      audit=audit), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
    try:
        port = add_tcp_listeners(server, config.listen, credentials)  # both loopback families
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}")
        unix = await add_unix_listener(server, config.unix_socket, peer_tickets)
    except BaseException:
        if fast_path is not None:
            await fast_path.close()
        await idempotency.close()
        audit.close()
        os.close(lock_fd)
        raise
    readiness = admission.readiness
    # Until the end of start-up: health says NOT_SERVING and no job is admitted.
    readiness.hold(Hold.SELFTEST, "the isolation self-test has not passed yet"
                   if config.selftest_on_start else "the broker is starting")
    await set_health(health_servicer, readiness.serving)
    await server.start()
    metrics_http = None
    if config.metrics_listen:
        metrics_http = metrics.serve(config.metrics_listen)
        log.info("Prometheus metrics on http://%s/metrics", config.metrics_listen)
    passed = True
    if config.selftest_on_start:
        report = await selftest()
        passed = report.passed
        if not passed:
            readiness.hold(Hold.SELFTEST,
                           "the isolation self-test failed: " + "; ".join(report.failures()))
            log.error("%s: NOT serving", readiness.why(Hold.SELFTEST))
        else:
            log.info("isolation self-test passed (%d checks, runtime %s)", len(report.checks),
                     report.runtime)
    if passed:
        readiness.release(Hold.SELFTEST)
        pools.start()
    await set_health(health_servicer, readiness.serving)
    follower = asyncio.create_task(follow_health(readiness, health_servicer),
                                   name="health-follower")
    log.info("broker listening on port %d (image %s, runtime %s, %s; %s)", port,
             config.sandbox.image, config.sandbox.runtime,
             exit_watch.describe(config.sandbox.exit_watch, config.sandbox.runtime_family),
             config.auth.describe())
    if config.auth.insecure_no_auth:
        log.warning("NO AUTHENTICATION on %s (--insecure-no-auth): anyone who can reach this "
                    "port can convert artifacts%s", config.listen,
                    " and drain or restart the pools" if config.auth.anonymous_admin else "")
    return Broker(server=server, port=port, health=health_servicer, admission=admission,
                  readiness=readiness, health_follower=follower, backend=backend, pools=pools,
                  onnx_validator=onnx_validator, audit=audit,
                  idempotency=idempotency, lock_fd=lock_fd, spool_root=config.spool_root,
                  signing_key=signing_key, fast_path=fast_path, unix=unix, trace=trace,
                  metrics_http=metrics_http)


async def follow_health(readiness: Readiness, health_servicer: health.aio.HealthServicer
                        ) -> None:
    """Keep gRPC health in step with ``readiness.serving`` (until cancelled, by ``stop``)."""
    while True:
        serving = readiness.serving
        await set_health(health_servicer, serving)
        await readiness.until_serving_is_not(serving)


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """The service's and the server's health status, both at once."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in (SERVICE_NAME, ""):
        await health_servicer.set(name, status)


async def _local_transfer(config: BrokerConfig,
                          owners: UidOwners) -> LocalTransferServer | None:
    """The same-host fast path's socket, if configured and safely placed (else None, logged)."""
    settings = config.local_transfer
    if not settings.enabled:
        log.info("same-host fast path off ([local_transfer] enabled = false)")
        return None
    local = LocalTransferServer(settings, config.transfer_socket_path,
                                config.max_artifact_bytes, owners)
    return local if await local.start() else None


async def serve(config: BrokerConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    raise_open_files_limit()
    broker = await create_server(config)
    host = config.listen.rsplit(":", 1)[0]
    print(f"airlock-broker: serving on {host}:{broker.port} ({config.auth.describe()}; "
          f"sandbox image {config.sandbox.image}, runtime {config.sandbox.runtime})", flush=True)
    if broker.unix is not None and broker.unix.path is not None:
        print(f"airlock-broker: local clients: unix:{broker.unix.path}", flush=True)
    print(f"airlock-broker: provenance signed with {broker.signing_key.path} "
          f"(fingerprint {broker.signing_key.fingerprint})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("airlock-broker: shutting down: finishing jobs in flight", flush=True)
    await broker.stop(config.shutdown_grace_seconds, config.shutdown_drain_seconds)
