"""Bounds on the gRPC server itself: calls in progress, streams per connection, the streams
anyone may hold open, and how long a connection may live (the numbers: ``[rpc]``,
security/exposure.RpcLimits; applied here and by api/server.py).

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
from typing import Any

import grpc

#: Methods that anyone may call and keep open as long as they like (auth.OPEN_SERVICES).
OPEN_STREAMS = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})


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
