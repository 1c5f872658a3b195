"""Gateway process: the public windflow.v1 API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from services.gateway.config import GatewayConfig
from services.gateway.service import GatewayService
from windflow.common import etcd, lifecycle, telemetry
from windflow.common.grpc_util import ServiceServer
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

log = logging.getLogger(__name__)


class WindflowServicer(windflow_pb2_grpc.WindflowServicer):
    """Translation only: proto in, GatewayService, proto out."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=await self._service.list_models())

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        return pb.CreateSessionResponse(session=await self._service.create_session(request.spec))

    async def Stream(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        async for message in self._service.stream(request_iterator):
            yield message

    async def Fork(self, request: pb.ForkRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return await self._service.fork(request)

    async def Rewind(
        self, request: pb.RewindRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return await self._service.rewind(request)

    async def Replay(
        self, request: pb.ReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        async for frame in self._service.replay(request):
            yield frame

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return await self._service.get_session(request.session_id)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(
            session=await self._service.close_session(request.session_id)
        )


async def run(config: GatewayConfig) -> int:
    telemetry.setup("windflow-gateway", config.otlp_endpoint)
    client = await etcd.connect(config.etcd)
    service = GatewayService(config, client)
    server = ServiceServer(config.listen, max_receive_bytes=config.max_message_bytes)
    server.add(
        windflow_pb2_grpc.add_WindflowServicer_to_server,
        WindflowServicer(service),
        "windflow.v1.Windflow",
    )
    address = await server.start()
    await server.set_serving()
    log.info("gateway serving on %s", address)
    serving = asyncio.create_task(server.wait(), name="gateway-server")
    try:
        return await lifecycle.wait_for_stop(serving)
    finally:
        await server.aclose()
        serving.cancel()
        await service.aclose()
        await client.close()
        telemetry.shutdown()
