"""The AdminService servicer: thin wrappers over ``Pools`` and the self-test, for operators.

One self-test runs at a time: callers that ask while it runs share its report (each run
starts containers outside the admission places, so 256 concurrent calls started 256). A
failure other than the ones each method expects is INTERNAL with a reason, its details in
the broker's log, not the caller's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.auth import current_principal
from airlock_broker.api.wire import status_of
from airlock_broker.conversion.audit import AuditLog
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.ops.selftest import SelfTestReport
from airlock_broker.sandboxes.pools import Pools
from airlock_broker.sandboxes.sandbox import SandboxUnavailable

log = logging.getLogger(__name__)


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, pools: Pools, selftest: Callable[[], Awaitable[SelfTestReport]], *,
                 max_concurrent_jobs: int = 0, audit: AuditLog | None = None) -> None:
        self.pools = pools
        self.selftest = selftest
        #: Where each action that changes the pools, and each self-test, is recorded.
        self.audit = audit
        #: Said in the pool status: what a client's batch should keep in flight.
        self.max_concurrent_jobs = max_concurrent_jobs
        #: The self-test under way, shared by every caller that asks meanwhile.
        self._selftest_run: asyncio.Future[SelfTestReport] | None = None

    async def _selftest_once(self) -> SelfTestReport:
        run = self._selftest_run
        if run is None or run.done():
            run = self._selftest_run = asyncio.ensure_future(self.selftest())
            run.add_done_callback(_retrieved)  # every caller may have gone meanwhile
        return await asyncio.shield(run)  # a caller gone does not end it for the others

    async def RunSelfTest(
        self, request: pb.RunSelfTestRequest,
        context: grpc.aio.ServicerContext[pb.RunSelfTestRequest, pb.RunSelfTestResponse],
    ) -> pb.RunSelfTestResponse:
        try:
            report = await self._selftest_once()
        except SandboxUnavailable as exc:
            await self._abort(context, "selftest", error(Reason.SANDBOX_UNAVAILABLE, str(exc)))
        except Exception:
            await self._abort(context, "selftest", _internal("RunSelfTest"))
        self._record(context, "selftest", outcome="ok", passed=report.passed,
                     image_id=report.image_id)
        return pb.RunSelfTestResponse(
            passed=report.passed, runtime=report.runtime, image_id=report.image_id,
            checks=[pb.SelfTestCheck(name=c.name, passed=c.passed, detail=c.detail,
                                     source=c.source, waived=c.waived) for c in report.checks])

    async def GetPoolStatus(
        self, request: pb.GetPoolStatusRequest,
        context: grpc.aio.ServicerContext[pb.GetPoolStatusRequest, pb.GetPoolStatusResponse],
    ) -> pb.GetPoolStatusResponse:
        return pb.GetPoolStatusResponse(pools=[pb.PoolStatus(
            profile=s.profile, warm=s.warm, busy=s.busy, starting=s.starting,
            failed_starts=s.failed_starts, served_warm=s.served_warm, served_cold=s.served_cold,
            oldest_warm_seconds=s.oldest_warm_seconds, image_id=s.image_id, runtime=s.runtime,
            draining=s.draining, unavailable=s.unavailable, importing=s.importing,
            ready=s.ready) for s in self.pools.status()],
            max_concurrent_jobs=self.max_concurrent_jobs)

    async def RestartPools(
        self, request: pb.RestartPoolsRequest,
        context: grpc.aio.ServicerContext[pb.RestartPoolsRequest, pb.RestartPoolsResponse],
    ) -> pb.RestartPoolsResponse:
        profile = request.profile or None
        try:
            replaced = await self.pools.restart(profile)
        except AirlockError as exc:
            await self._abort(context, "restart", exc, profile=profile)
        except Exception:
            await self._abort(context, "restart", _internal("RestartPools"), profile=profile)
        self._record(context, "restart", outcome="ok", profile=profile, replaced=replaced)
        return pb.RestartPoolsResponse(replaced=replaced)

    async def DrainPools(
        self, request: pb.DrainPoolsRequest,
        context: grpc.aio.ServicerContext[pb.DrainPoolsRequest, pb.DrainPoolsResponse],
    ) -> pb.DrainPoolsResponse:
        self.pools.drain()
        self._record(context, "drain", outcome="ok")
        return pb.DrainPoolsResponse()

    async def ResumePools(
        self, request: pb.ResumePoolsRequest,
        context: grpc.aio.ServicerContext[pb.ResumePoolsRequest, pb.ResumePoolsResponse],
    ) -> pb.ResumePoolsResponse:
        self.pools.resume()
        self._record(context, "resume", outcome="ok")
        return pb.ResumePoolsResponse()

    def _record(self, context: grpc.aio.ServicerContext, action: str,  # type: ignore[type-arg]
                **fields: object) -> None:
        """The action in the audit log, with the principal that asked (auth.py set it)."""
        if self.audit is not None:
            caller = current_principal()
            self.audit.action(action, caller.name, caller.method, context.peer(), **fields)

    async def _abort(self, context: grpc.aio.ServicerContext, action: str,  # type: ignore[type-arg]
                     exc: AirlockError, **fields: object) -> None:
        self._record(context, action, outcome=exc.kind.value, reason=exc.reason.value,
                     message=exc.message, **fields)
        await _abort(context, exc)


def _internal(method: str) -> AirlockError:
    """An unexpected failure of ``method``: logged whole here (called in its ``except``),
    INTERNAL with one sentence for the caller (no paths, no exception text)."""
    log.exception("%s failed", method)
    return error(Reason.INTERNAL, f"{method} failed on the broker; see its log")


async def _abort(context: grpc.aio.ServicerContext, exc: AirlockError) -> None:  # type: ignore[type-arg]
    await context.abort_with_status(rpc_status.to_status(status_of(exc, "")))


def _retrieved(run: asyncio.Future[SelfTestReport]) -> None:
    if not run.cancelled():
        run.exception()  # read, so an error no caller waited for is not reported as lost
