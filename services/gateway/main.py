"""Gateway process: the public windflow.v1 API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from services.gateway.access import Access
from services.gateway.config import GatewayConfig
from services.gateway.service import GatewayService
from windflow.access.keys import AccessStore, AccessView
from windflow.access.tokens import Claims, bearer
from windflow.common import etcd, lifecycle, metrics, telemetry
from windflow.common.grpc_util import ServiceServer
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL_S = 3600.0


class WindflowServicer(windflow_pb2_grpc.WindflowServicer):
    """Translation only: proto in, the caller's verified token, GatewayService, proto out."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service
        self._access = service.access

    def _caller(self, context: grpc.aio.ServicerContext) -> Claims | None:
        return self._access.caller(context.invocation_metadata() or ())

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=await self._service.list_models(self._caller(context)))

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        claims = self._caller(context)
        return pb.CreateSessionResponse(
            session=await self._service.create_session(request.spec, claims)
        )

    async def Stream(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        claims = self._caller(context)
        async for message in self._service.stream(request_iterator, claims):
            yield message

    async def Fork(self, request: pb.ForkRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return await self._service.fork(request, self._caller(context))

    async def ForkMany(
        self, request: pb.ForkManyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForkManyResponse:
        return await self._service.fork_many(request, self._caller(context))

    async def Rewind(
        self, request: pb.RewindRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return await self._service.rewind(request, self._caller(context))

    async def Replay(
        self, request: pb.ReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        claims = self._caller(context)
        async for frame in self._service.replay(request, claims):
            yield frame

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return await self._service.get_session(request.session_id, self._caller(context))

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        claims = self._caller(context)
        return pb.CloseSessionResponse(
            session=await self._service.close_session(request.session_id, claims)
        )


class AccessServicer(windflow_pb2_grpc.AccessServicer):
    """Session tokens minted with a tenant's API key (the call's bearer credential)."""

    def __init__(self, store: AccessStore) -> None:
        self._store = store

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTokenResponse:
        api_key = bearer(context.invocation_metadata() or ())
        token, claims = await self._store.mint(
            api_key,
            models=list(request.models),
            regions=list(request.regions),
            max_sessions=request.max_sessions,
            budget_s=request.budget_s,
            ttl_s=request.ttl_s or DEFAULT_TOKEN_TTL_S,
        )
        return pb.CreateTokenResponse(
            token=token,
            token_id=claims.jti,
            tenant=claims.tenant,
            expires_unix_ms=claims.exp * 1000,
            kid=claims.kid,
        )


async def run(config: GatewayConfig) -> int:
    telemetry.setup("windflow-gateway", config.otlp_endpoint)
    exporting = await metrics.start(
        "windflow-gateway", listen=config.metrics_listen, otlp_endpoint=config.otlp_endpoint
    )
    client = await etcd.connect(config.etcd)
    view = None
    if config.insecure:
        log.warning(
            "INSECURE: no authentication; any caller may create, attach to, fork or close "
            "any session (--insecure)"
        )
    else:
        view = AccessView(client)
        await view.start()
        await AccessStore(client).active_signing_key()  # the first one, made once
    service = GatewayService(config, client, Access(client, view, config.quotas))
    server = ServiceServer(config.listen, max_receive_bytes=config.max_message_bytes)
    server.add(
        windflow_pb2_grpc.add_WindflowServicer_to_server,
        WindflowServicer(service),
        "windflow.v1.Windflow",
    )
    server.add(
        windflow_pb2_grpc.add_AccessServicer_to_server,
        AccessServicer(AccessStore(client)),
        "windflow.v1.Access",
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
        if view is not None:
            await view.aclose()
        await client.close()
        await exporting.aclose()
        telemetry.shutdown()
