"""Bounds on the gRPC server itself: calls in progress, streams per connection, the streams
anyone may hold open, and how long a connection may live.

Admission (admission.py) bounds *jobs*; these bound what is not a job: a health watcher or a
reflection stream costs nothing to open, needs no token and can stay open for ever; an HTTP/2
stream whose caller stopped reading stays in gRPC's hands after the broker gave up on it
(answers.py). Without these, enough of either refuses every other call, health checks
included.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

#: Methods that anyone may call and keep open as long as they like (auth.OPEN_SERVICES).
OPEN_STREAMS = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})


@dataclass(frozen=True)
class RpcLimits:
    """The ``[rpc]`` section. Every limit is finite; each number says why it is what it is."""

    #: Calls in progress at once, every method together (gRPC answers RESOURCE_EXHAUSTED
    #: beyond it). The backstop against floods of calls (each costs a task and its HTTP/2
    #: buffers): well above the 18 job places and ``max_open_streams``, because calls beyond
    #: the places are already refused by admission, with BUSY and a reason.
    max_concurrent_rpcs: int = 256
    #: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls one connection may have open at once;
    #: beyond it a new stream is refused (REFUSED_STREAM, which clients see as UNAVAILABLE and
    #: retry). gRPC clients share one connection per address among a process's channels, so
    #: this is also what one client process may have in flight: as many as
    #: ``max_concurrent_rpcs`` (a 200-call burst from one process is a tested case). It bounds
    #: the stream state one connection can make the broker hold.
    max_streams_per_connection: int = 256
    #: Health.Watch and reflection streams open at once (``OPEN_STREAMS``); beyond it a new
    #: one is refused with RESOURCE_EXHAUSTED. Load balancers and probes use one or two each.
    max_open_streams: int = 16
    #: A connection is asked to close (GOAWAY) after this long; clients reconnect for new
    #: calls. With the grace below, this is what finally ends an HTTP/2 stream whose caller
    #: never reads and never leaves (its handler gave up at ``answer_drain_seconds``).
    max_connection_age_seconds: float = 3600.0
    #: Calls in progress on a connection asked to close get this long to finish; then the
    #: connection is closed. Half an hour: longer than a job (``max_job_seconds``) plus its
    #: answer (``answer_drain_seconds``), and a call cut short is retried by the client with
    #: its idempotency key.
    connection_age_grace_seconds: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("max_concurrent_rpcs", "max_streams_per_connection", "max_open_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"[rpc] {name} must be at least 1")
        if self.max_open_streams >= self.max_concurrent_rpcs:
            raise ValueError("[rpc] max_open_streams must stay below max_concurrent_rpcs, or "
                             "idle watchers can refuse every other call")
        if self.max_connection_age_seconds <= 0 or self.connection_age_grace_seconds <= 0:
            raise ValueError("[rpc] connection ages must be positive")

    def server_options(self) -> list[tuple[str, int]]:
        """Channel arguments for ``grpc.aio.server``."""
        return [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.connection_age_grace_seconds * 1000)),
        ]


class OpenStreamLimiter(grpc.aio.ServerInterceptor):
    """Refuses an ``OPEN_STREAMS`` call while ``limit`` of them are open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in OPEN_STREAMS:
            return handler
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._bounded(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._bounded(handler.stream_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler

    def _bounded(self, behaviour: Any) -> Any:
        """The handler, counted, of the same kind: the health servicer's Watch is a coroutine
        writing with ``context.write``, reflection an async generator (and the metrics
        interceptor outside this one iterates generators)."""
        if inspect.isasyncgenfunction(behaviour):
            async def generator(request: Any,
                                context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async with self._place(context):
                    async for message in behaviour(request, context):
                        yield message
            return generator

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._place(context):
                return await behaviour(request, context)
        return coroutine

    @contextlib.asynccontextmanager
    async def _place(self, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        if self.open >= self.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.open} health-watch and reflection streams are open, the "
                                f"limit is {self.limit} ([rpc] max_open_streams); use "
                                "Health.Check, or close a stream")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
