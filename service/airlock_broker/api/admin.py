"""The AdminService servicer: thin wrappers over ``Pools`` and the self-test, for operators."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.api.wire import status_of
from airlock_broker.errors import AirlockError, Reason, error
from airlock_broker.ops.selftest import SelfTestReport
from airlock_broker.sandboxes.pools import Pools
from airlock_broker.sandboxes.sandbox import SandboxUnavailable


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, pools: Pools, selftest: Callable[[], Awaitable[SelfTestReport]], *,
                 max_concurrent_jobs: int = 0) -> None:
        self.pools = pools
        self.selftest = selftest
        #: Said in the pool status: what a client's batch should keep in flight.
        self.max_concurrent_jobs = max_concurrent_jobs

    async def RunSelfTest(
        self, request: pb.RunSelfTestRequest,
        context: grpc.aio.ServicerContext[pb.RunSelfTestRequest, pb.RunSelfTestResponse],
    ) -> pb.RunSelfTestResponse:
        try:
            report = await self.selftest()
        except SandboxUnavailable as exc:
            err = error(Reason.SANDBOX_UNAVAILABLE, str(exc))
            await context.abort_with_status(rpc_status.to_status(status_of(err, "")))
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
        try:
            replaced = await self.pools.restart(request.profile or None)
        except AirlockError as exc:
            await context.abort_with_status(rpc_status.to_status(status_of(exc, "")))
        return pb.RestartPoolsResponse(replaced=replaced)

    async def DrainPools(
        self, request: pb.DrainPoolsRequest,
        context: grpc.aio.ServicerContext[pb.DrainPoolsRequest, pb.DrainPoolsResponse],
    ) -> pb.DrainPoolsResponse:
        self.pools.drain()
        return pb.DrainPoolsResponse()

    async def ResumePools(
        self, request: pb.ResumePoolsRequest,
        context: grpc.aio.ServicerContext[pb.ResumePoolsRequest, pb.ResumePoolsResponse],
    ) -> pb.ResumePoolsResponse:
        self.pools.resume()
        return pb.ResumePoolsResponse()
