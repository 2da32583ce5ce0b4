"""Prometheus metrics, served on their own port (``airlock-broker serve --metrics HOST:PORT``).

Everything is labelled by bounded sets (outcome, reason, profile, gRPC method and code),
never by anything a caller chooses, so the series count stays fixed.

The endpoint has no authentication, and what it shows (load, failure reasons, pool states,
when a sandbox fails to start) helps whoever times an attack; so it binds to loopback
only (security/exposure.py) unless ``--metrics-public`` (``[broker] metrics_public = true``)
says otherwise, visibly.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from airlock_broker.conversion.admission import Admission
from airlock_broker.conversion.input_room import RamSpool
from airlock_broker.ops.metrics_http import serve_metrics
from airlock_broker.sandboxes.pool_state import PoolStatus
from airlock_broker.sandboxes.pools import Pools

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("airlock_jobs", "Jobs finished, by outcome and reason",
                            ["outcome", "reason"], registry=r)
        self.job_seconds = Histogram("airlock_job_duration_seconds",
                                     "Job wall time, request to last byte, by outcome",
                                     ["outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("airlock_artifact_bytes_in", "Artifact bytes received",
                                registry=r)
        self.bytes_out = Counter("airlock_output_bytes_out", "Validated output bytes returned",
                                 registry=r)
        self.replays = Counter("airlock_idempotent_replays", "Requests answered with an earlier "
                               "job's result for the same idempotency key, by how the key "
                               "matched (completed, in_flight)", ["matched"], registry=r)
        self.transfers = Counter("airlock_job_transfers", "Jobs finished, by how the artifact "
                                 "and output moved: stream (gRPC chunks), local (descriptors "
                                 "on the same-host socket), none (no metadata read)",
                                 ["transfer"], registry=r)
        self.rpcs = Counter("airlock_grpc_server_handled", "RPCs completed",
                            ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("airlock_grpc_server_handling_seconds", "RPC wall time",
                                     ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("airlock_jobs_in_broker", "Jobs admitted (uploading, waiting or "
                           "running)", registry=r)
        self.pool = Gauge("airlock_pool_containers", "Sandbox containers by profile and state",
                          ["profile", "state"], registry=r)
        self.pool_warm = Gauge("airlock_pool_warm_containers", "Warm containers by profile and "
                               "what their worker says: importing (its libraries) or ready "
                               "(waiting for a job); a hint from the sandboxes",
                               ["profile", "readiness"], registry=r)
        self.pool_events = Gauge("airlock_pool_events", "Cumulative pool events by profile "
                                 "(served_warm, served_cold, failed_starts)",
                                 ["profile", "event"], registry=r)
        self.pool_target = Gauge("airlock_pool_target_warm", "Warm containers a pool keeps now: "
                                 "min_warm, raised for the stream of jobs (within max_warm "
                                 "and the memory budget)", ["profile"], registry=r)
        self.pool_rate = Gauge("airlock_pool_jobs_per_minute", "Jobs per minute asking a pool "
                               "for a container, over [pools] stream_window_seconds",
                               ["profile"], registry=r)
        self.pool_refill = Gauge("airlock_pool_refill_seconds", "Learned time from a warm "
                                 "container's start to its worker's ready mark",
                                 ["profile"], registry=r)
        self.drained = Gauge("airlock_pools_drained", "1 while an operator's drain holds "
                             "(airlock pool drain, until resume): new jobs are refused and the "
                             "pools do not refill", registry=r)
        self.ram_spool = Gauge("airlock_ram_spool_bytes", "The RAM spool ([spool] ram_bytes): "
                               "its budget, what its tmpfs holds (inputs of jobs in flight), "
                               "what uploads in progress have claimed", ["what"], registry=r)

    def bind(self, admission: Admission, pools: Pools, ram: RamSpool | None = None) -> None:
        """Gauges read live state at scrape time instead of being updated on every change.
        Called on the broker's event loop: the pools are read there (:class:`PoolSnapshot`)."""
        self.queue.set_function(lambda: admission.admitted)
        if ram is not None:  # thread-safe: read on the scraping thread
            for what in ("budget", "used", "claimed"):
                self.ram_spool.labels(what).set_function(
                    lambda what=what: ram.status()[what])  # type: ignore[misc]
        snapshot = PoolSnapshot(pools, asyncio.get_running_loop())
        if pools.pools:  # a drain holds for every pool: any one says it
            self.drained.set_function(_reader(snapshot, next(iter(pools.pools)), "draining"))
        for profile in pools.pools:
            for state in ("warm", "busy", "starting"):
                self.pool.labels(profile, state).set_function(
                    _reader(snapshot, profile, state))
            for readiness in ("importing", "ready"):
                self.pool_warm.labels(profile, readiness).set_function(
                    _reader(snapshot, profile, readiness))
            for event in ("served_warm", "served_cold", "failed_starts"):
                self.pool_events.labels(profile, event).set_function(
                    _reader(snapshot, profile, event))
            self.pool_target.labels(profile).set_function(_reader(snapshot, profile, "target"))
            self.pool_rate.labels(profile).set_function(
                _reader(snapshot, profile, "jobs_per_minute"))
            self.pool_refill.labels(profile).set_function(
                _reader(snapshot, profile, "refill_seconds"))

    def serve(self, listen: str) -> WSGIServer:
        """Serve the metrics on ``listen`` (bounded: ops/metrics_http.py)."""
        host, _, port = listen.rpartition(":")
        return serve_metrics(host.strip("[]") or "127.0.0.1", int(port), self.registry)

    def job_done(self, outcome: str, reason: str | None, seconds: float) -> None:
        self.jobs.labels(outcome, reason or "").inc()
        self.job_seconds.labels(outcome).observe(seconds)


class PoolSnapshot:
    """The pools' status for the scraper, read on the event loop that owns them.

    The HTTP server answers scrapes on a thread of its own; reading the pools' deques there
    raced with the loop ("deque mutated during iteration": a 500 to the scraper). So a scrape
    asks the loop for one status and every gauge of that scrape reads it."""

    #: A scrape reads a dozen gauges per profile within milliseconds: one status serves them.
    MAX_AGE_SECONDS = 0.5

    def __init__(self, pools: Pools, loop: asyncio.AbstractEventLoop) -> None:
        self.pools = pools
        self.loop = loop
        self._lock = threading.Lock()
        self._at = -1.0
        self._status: dict[str, PoolStatus] = {}

    def get(self, profile: str) -> PoolStatus | None:
        with self._lock:
            now = time.monotonic()
            if self._at < 0 or now - self._at > self.MAX_AGE_SECONDS:
                self._status = {s.profile: s for s in self._read()}
                self._at = now
            return self._status.get(profile)

    def _read(self) -> list[PoolStatus]:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # asked on the loop itself (a test's collect): read here
            return self.pools.status()

        async def read() -> list[PoolStatus]:
            return self.pools.status()
        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=10)


def _reader(snapshot: PoolSnapshot, profile: str, field: str) -> Callable[[], float]:
    def read() -> float:
        status = snapshot.get(profile)
        return float(getattr(status, field)) if status is not None else 0.0
    return read


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, with its wall time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def wrap_unary(fn: Any) -> Any:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                began = time.monotonic()
                try:
                    return await fn(request, context)
                finally:
                    _record(metrics, method, context, began)
            return wrapped

        def wrap_stream(fn: Any) -> Any:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                began = time.monotonic()
                try:
                    async for item in fn(request, context):
                        yield item
                finally:
                    _record(metrics, method, context, began)
            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_unary:  # a unary method, as api/rpc_limits.RequestArrival serves it
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler  # a coroutine writing with context.write (the health Watch)


def _record(metrics: Metrics, method: str, context: Any, began: float) -> None:
    code = context.code() if hasattr(context, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "OK"
    metrics.rpcs.labels(method, name).inc()
    metrics.rpc_seconds.labels(method).observe(time.monotonic() - began)
