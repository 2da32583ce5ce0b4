"""The PoolAdmin servicer: thin wrappers over ``Pools`` for operators."""

from __future__ import annotations

import grpc
from grpc_status import rpc_status

from airlock.v1 import airlock_pb2 as pb
from airlock.v1 import airlock_pb2_grpc as pb_grpc
from airlock_broker.errors import AirlockError
from airlock_broker.pools import Pools
from airlock_broker.wire import status_of


class PoolAdminServicer(pb_grpc.PoolAdminServicer):
    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    async def GetPoolStatus(
        self, request: pb.GetPoolStatusRequest,
        context: grpc.aio.ServicerContext[pb.GetPoolStatusRequest, pb.GetPoolStatusResponse],
    ) -> pb.GetPoolStatusResponse:
        return pb.GetPoolStatusResponse(pools=[pb.PoolStatus(
            profile=s.profile, warm=s.warm, busy=s.busy, starting=s.starting,
            failed_starts=s.failed_starts, served_warm=s.served_warm, served_cold=s.served_cold,
            oldest_warm_seconds=s.oldest_warm_seconds, image_id=s.image_id, runtime=s.runtime,
            draining=s.draining) for s in self.pools.status()])

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
