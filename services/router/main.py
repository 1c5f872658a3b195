"""Router process: placement over the live worker table in etcd."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context

from services.router.config import RouterConfig
from services.router.service import RouterService
from windflow.common import etcd, lifecycle, telemetry
from windflow.common.events import EventBus
from windflow.common.grpc_util import ServiceServer
from windflow.v1 import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)


class RouterServicer(internal_pb2_grpc.RouterServicer):
    def __init__(self, service: RouterService) -> None:
        self._service = service

    async def Recover(
        self, request: internal_pb2.RecoverRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.Placement:
        return await self._service.recover(request)

    async def Place(
        self, request: internal_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.Placement:
        parent = telemetry.extract_metadata(context.invocation_metadata())
        token = otel_context.attach(parent)
        try:
            return await self._service.place(request)
        finally:
            otel_context.detach(token)

    async def Migrate(
        self, request: internal_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.MigrationResult:
        return await self._service.migrator.migrate(request)

    async def Drain(
        self, request: internal_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[internal_pb2.DrainProgress]:
        async for progress in self._service.migrator.drain(request):
            yield progress


async def run(config: RouterConfig) -> int:
    telemetry.setup("windflow-router", config.otlp_endpoint)
    client = await etcd.connect(config.etcd)
    bus = EventBus(config.nats, "router")
    await bus.connect()
    service = RouterService(config, client, bus)
    await service.start()
    server = ServiceServer(config.listen)
    server.add(
        internal_pb2_grpc.add_RouterServicer_to_server,
        RouterServicer(service),
        "windflow.v1.Router",
    )
    address = await server.start()
    await server.set_serving()
    log.info("router serving on %s", address)
    try:
        assert service.watch_task is not None
        return await lifecycle.wait_for_stop(service.watch_task)
    finally:
        await server.aclose()
        await service.aclose()
        await bus.aclose()
        await client.close()
        telemetry.shutdown()
