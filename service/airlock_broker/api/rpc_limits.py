"""Bounds on the gRPC server itself: calls in progress, streams per connection, the streams
anyone may hold open, and how long a connection may live (the numbers: ``[rpc]``,
security/exposure.RpcLimits; applied here and by api/server.py).

Admission (admission.py) bounds *jobs*; these bound what is not a job: a health watcher or a
reflection stream costs nothing to open, needs no token and can stay open for ever; an HTTP/2
stream whose caller stopped reading stays in gRPC's hands after the broker gave up on it
(answers.py). Without these, enough of either refuses every other call, health checks
included; and streams given up on, each held by gRPC until its connection closes, are bounded
per peer (``StuckAnswers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from airlock_broker.api.auth import current_principal

#: Methods that anyone may call and keep open as long as they like (auth.OPEN_SERVICES).
OPEN_STREAMS = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})


class CallLimiter(grpc.aio.ServerInterceptor):
    """Refuses a call, RESOURCE_EXHAUSTED with the numbers, while ``limit`` calls are in
    progress (``[rpc] max_concurrent_rpcs``, every method together).

    gRPC's own ``maximum_concurrent_rpcs`` counts a call until its HTTP/2 stream closes, which
    no servicer can hasten: an answer stays queued until the caller's flow-control window lets
    it out, and a caller that sets its stream windows to 0 never does. 256 health checks (no
    credentials needed) on one connection held every place for the connection's age (an hour
    and a half), and every other call was refused (found in the eleventh review). Here a call
    counts while its task runs: its request, its method and the sending of its answer, which
    ``RequestArrival`` bounds in time. What such a stream still costs is gRPC's until its
    connection closes (at most ``max_stuck_answers_per_peer`` of one peer: ``StuckAnswers``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        task = asyncio.current_task()
        if task is None:  # not a call's task: nothing to count
            return await continuation(handler_call_details)
        if self.calls >= self.limit:
            handler = await continuation(handler_call_details)
            return None if handler is None else _refusing(
                handler, f"{self.calls} calls are in progress, the limit is {self.limit} "
                         "([rpc] max_concurrent_rpcs); retry shortly")
        self.calls += 1

        def ended(_: object) -> None:
            self.calls -= 1
        task.add_done_callback(ended)
        return await continuation(handler_call_details)


def _refusing(handler: grpc.RpcMethodHandler[Any, Any],
              message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s kind that refuses its call (RESOURCE_EXHAUSTED) at once."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
            else grpc.unary_stream_rpc_method_handler if handler.unary_stream
            else grpc.stream_unary_rpc_method_handler if handler.stream_unary
            else grpc.stream_stream_rpc_method_handler)
    return make(refuse, handler.request_deserializer, handler.response_serializer)


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


#: A request sent with its call arrives with it: what a call gets when its principal already
#: has ``max_waiting_calls`` waiting (a withheld one is then refused this soon, so holding
#: places beyond the limit takes a flood of calls, not a trickle).
PROMPT_SECONDS = 0.01
_NO_REQUEST = object()


class RequestArrival(grpc.aio.ServerInterceptor):
    """Takes a method's one request message with a time limit, and bounds how many calls of
    one principal wait for theirs.

    gRPC counts a call against ``max_concurrent_rpcs`` from its first frame, but runs a
    method that takes one request (all but Convert and reflection) only once that request
    has arrived: a caller that sends the call's headers and withholds its message held a
    place for ever, and ``max_concurrent_rpcs`` such calls refused every other call, health
    checks included, with no credentials needed. Here such a method is served as one that
    streams its request: its handler runs at once (the interceptors outside this one first:
    authentication refuses a caller without credentials before anything is read), takes the
    first message within ``seconds`` (else DEADLINE_EXCEEDED) and calls the method with it.
    Every call is counted while it waits for its request: at most ``limit`` calls of one
    principal wait (``auth.current_principal``: every caller of an open method, such as a
    health check, and every caller with authentication off is ``anonymous``); a call beyond
    them gets ``PROMPT_SECONDS`` for its request, then RESOURCE_EXHAUSTED. So withheld
    requests never take every place, and calls that send theirs are served beside them.

    A unary method's answer is counted the same way until it has left (``_answer_taken_in_time``):
    ending the call's task then does not withdraw the answer (gRPC still sends it to a caller
    that reads); it only gives the place back. Such an answer is counted in ``stuck`` against
    its caller's peer, whose new calls are refused while it has too many (``StuckAnswers``).
    """

    def __init__(self, seconds: float, limit: int, stuck: StuckAnswers | None = None) -> None:
        self.seconds = seconds
        self.limit = limit
        self.waiting: dict[str, int] = {}
        self.stuck = stuck

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        served = self._served(handler)
        return served if self.stuck is None else _refused_first(served,
                                                                self.stuck.refuse_if_full)

    def _served(self, handler: grpc.RpcMethodHandler[Any, Any]
                ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler``, its one request (if it takes one) streamed and taken in time."""
        if handler.unary_unary:
            unary: Any = handler.unary_unary  # an aio handler: a coroutine function

            async def streamed_unary(requests: Any,
                                     context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                answer = await unary(await self._request(requests, context), context)
                self._answer_taken_in_time(context)
                return answer
            return grpc.stream_unary_rpc_method_handler(
                streamed_unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._streamed(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler

    def _streamed(self, behaviour: Any) -> Any:
        """A server-streaming method, of the same kind (a coroutine that writes with
        ``context.write``, as the health servicer's Watch, or an async generator)."""
        if inspect.isasyncgenfunction(behaviour):
            async def generator(requests: Any,
                                context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async for message in behaviour(await self._request(requests, context),
                                               context):
                    yield message
            return generator

        async def coroutine(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behaviour(await self._request(requests, context), context)
        return coroutine

    def _answer_taken_in_time(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The answer the method returned goes out after it returns, from the call's own task,
        which ends (and gives up its place in ``max_concurrent_rpcs``) only once the caller's
        HTTP/2 windows let it out: a caller whose stream windows are 0 kept it for the
        connection's age. So the call counts as waiting (as for its request) until its task
        ends, and is cancelled if its answer is not out within ``seconds``, or within
        ``PROMPT_SECONDS`` when its principal already has ``limit`` calls waiting; one cancelled
        so is counted in ``stuck`` (its stream stays in gRPC)."""
        task = asyncio.current_task()
        assert task is not None, "a method runs in its call's task"
        who = current_principal().quota
        peer = peer_key(context) if self.stuck is not None else ""
        full = self.waiting.get(who, 0) >= self.limit
        self.waiting[who] = self.waiting.get(who, 0) + 1

        def give_up() -> None:
            if task.done():  # out just now: its end's callback has not run yet
                return
            if self.stuck is not None:
                self.stuck.record(peer)
            task.cancel()
        timer = asyncio.get_running_loop().call_later(
            PROMPT_SECONDS if full else self.seconds, give_up)

        def ended(_: object) -> None:
            timer.cancel()
            self.waiting[who] -= 1
            if not self.waiting[who]:
                del self.waiting[who]
        task.add_done_callback(ended)

    async def _request(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        who = current_principal().quota
        # Counted from the start: a call is never uncounted while it holds a place. At the
        # limit, a call gets only as long as a request sent with it takes to be read.
        full = self.waiting.get(who, 0) >= self.limit
        self.waiting[who] = self.waiting.get(who, 0) + 1
        # The next message, as a task: cancelling an aio request stream's own step would end
        # the stream.
        arriving = asyncio.ensure_future(anext(requests, _NO_REQUEST))
        try:
            done, _ = await asyncio.wait(
                {arriving}, timeout=PROMPT_SECONDS if full else self.seconds)
        finally:
            self.waiting[who] -= 1
            if not self.waiting[who]:
                del self.waiting[who]
            if not arriving.done():
                arriving.cancel()
        if not done and full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.limit} calls of principal {who!r} are waiting for "
                                f"their request message, the limit is {self.limit} ([rpc] "
                                "max_waiting_calls); send each call's request with it")
        if not done:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no request message arrived within {self.seconds:g} s ([rpc] "
                                "request_seconds)")
        request = arriving.result()
        if request is _NO_REQUEST:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the call ended without its request message")
        return request


#: Peers whose stuck answers are remembered at once; beyond, the one recorded longest ago is
#: forgotten (the bookkeeping's own memory is bounded: about 2.5 KB a peer at the default).
MAX_PEERS_TRACKED = 4096


def peer_key(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Whom a stuck answer counts against: a TCP caller's IP address (an IPv6 one's /64, which
    one host is given whole), a Unix-socket caller's principal (``unix:uid:N``; the socket's
    peer address says nothing)."""
    kind, _, address = context.peer().partition(":")
    if kind not in ("ipv4", "ipv6"):
        return f"unix:{current_principal().quota}"
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class StuckAnswers:
    """Answers that did not leave in time, counted against their caller's peer (``peer_key``),
    and the refusal of a peer's new calls while it has ``limit`` of them.

    An answer ``RequestArrival`` gave up on stays in gRPC as a stuck HTTP/2 stream (about
    15 KB) until its connection closes, which the broker cannot hasten nor see: so each is
    counted for the longest a connection lives (``keep_seconds``: ``max_connection_age`` plus
    its grace). Without this, one client with windows of 0 held ``max_streams_per_connection``
    of them on each of ``max_connections`` connections: a million, some 15 GiB (found after
    the eleventh review). A refusal is trailers only, no DATA, so it leaves through a window
    of 0 and its stream closes."""

    def __init__(self, limit: int, keep_seconds: float,
                 peers: int = MAX_PEERS_TRACKED) -> None:
        self.limit = limit
        self.keep_seconds = keep_seconds
        self.peers = peers
        #: Per peer, when its stuck answers stop counting (the latest ``limit``: enough to
        #: know whether it has ``limit``), peers in the order they last had one.
        self.until: OrderedDict[str, deque[float]] = OrderedDict()

    def record(self, peer: str) -> None:
        times = self.until.get(peer)
        if times is None:
            times = self.until[peer] = deque(maxlen=self.limit)
            while len(self.until) > self.peers:
                self.until.popitem(last=False)
        times.append(time.monotonic() + self.keep_seconds)
        self.until.move_to_end(peer)

    def held(self, peer: str) -> int:
        """How many of ``peer``'s answers count as stuck now (at most ``limit``)."""
        times = self.until.get(peer)
        if times is None:
            return 0
        now = time.monotonic()
        while times and times[0] <= now:
            times.popleft()
        if not times:
            del self.until[peer]
        return len(times)

    async def refuse_if_full(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """RESOURCE_EXHAUSTED, with the numbers, if the caller's peer has ``limit``."""
        peer = peer_key(context)
        held = self.held(peer)
        if held < self.limit:
            return
        wait = self.until[peer][0] - time.monotonic()
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{held} answers to calls from {peer} did not leave within [rpc] request_seconds "
            f"(the caller's HTTP/2 windows kept them in), the limit is {self.limit} ([rpc] "
            f"max_stuck_answers_per_peer): read your calls' answers; each counts for "
            f"{self.keep_seconds:g} s, whether or not you reconnect, so retry in {wait:.0f} s")


def _refused_first(handler: grpc.RpcMethodHandler[Any, Any],
                   check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
                   ) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` (streaming its request, as ``RequestArrival`` serves every method), with
    ``check`` awaited before it runs."""
    behaviour: Any = handler.stream_unary or handler.stream_stream
    if inspect.isasyncgenfunction(behaviour):
        async def generator(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            async for message in behaviour(requests, context):
                yield message
        checked: Any = generator
    else:
        async def coroutine(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await behaviour(requests, context)
        checked = coroutine
    make = (grpc.stream_unary_rpc_method_handler if handler.stream_unary
            else grpc.stream_stream_rpc_method_handler)
    return make(checked, handler.request_deserializer, handler.response_serializer)
