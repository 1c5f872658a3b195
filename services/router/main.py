"""Router process: placement over the live worker table in etcd.

Several replicas may run: they elect a leader through etcd (``services.router.leader``);
a follower forwards every RPC to it, so a client may dial any replica.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context

from services.router.config import RouterConfig
from services.router.leader import Leadership
from services.router.rebalance import RebalanceParams, Rebalancer
from services.router.service import RouterService
from windflow.common import etcd, grpc_util, lifecycle, metrics, telemetry
from windflow.common.events import EventBus
from windflow.common.grpc_util import ServiceServer
from windflow.errors import Unavailable
from windflow.v1 import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)


class RouterServicer(internal_pb2_grpc.RouterServicer):
    def __init__(self, service: RouterService) -> None:
        self._service = service
        self._channels = grpc_util.Channels()

    async def _leader(self) -> internal_pb2_grpc.RouterStub | None:
        """The leading replica's stub when this one does not lead (None when it does)."""
        leadership = self._service.leadership
        if leadership is None or leadership.holds():
            return None
        address = await leadership.leader_address()
        if not address or address == leadership.address:
            raise Unavailable("no router replica leads right now", retry_after_s=0.5)
        return internal_pb2_grpc.RouterStub(self._channels.get(address))

    @staticmethod
    def _passed_on(context: grpc.aio.ServicerContext) -> dict[str, object]:
        remaining = context.time_remaining()
        return {"timeout": remaining, "metadata": tuple(context.invocation_metadata() or ())}

    async def Recover(
        self, request: internal_pb2.RecoverRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.Placement:
        if (leader := await self._leader()) is not None:
            return await grpc_util.call(leader.Recover(request, **self._passed_on(context)))
        return await self._service.recover(request)

    async def Place(
        self, request: internal_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.Placement:
        if (leader := await self._leader()) is not None:
            return await grpc_util.call(leader.Place(request, **self._passed_on(context)))
        parent = telemetry.extract_metadata(context.invocation_metadata())
        token = otel_context.attach(parent)
        try:
            return await self._service.place(request)
        finally:
            otel_context.detach(token)

    async def Migrate(
        self, request: internal_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.MigrationResult:
        if (leader := await self._leader()) is not None:
            return await grpc_util.call(leader.Migrate(request, **self._passed_on(context)))
        return await self._service.migrator.migrate(request)

    async def Drain(
        self, request: internal_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[internal_pb2.DrainProgress]:
        if (leader := await self._leader()) is not None:
            call = leader.Drain(request, **self._passed_on(context))
            try:
                async for progress in call:
                    yield progress
            except grpc.aio.AioRpcError as exc:
                raise grpc_util.error_from_rpc(exc) from exc
            return
        async for progress in self._service.migrator.drain(request):
            yield progress

    async def aclose(self) -> None:
        await self._channels.aclose()


async def run(config: RouterConfig) -> int:
    telemetry.setup("windflow-router", config.otlp_endpoint)
    exporting = await metrics.start(
        "windflow-router", listen=config.metrics_listen, otlp_endpoint=config.otlp_endpoint
    )
    client = await etcd.connect(config.etcd)
    bus = EventBus(config.nats, "router")
    await bus.connect()
    service = RouterService(config, client, bus)
    await service.start()
    server = ServiceServer(config.listen)
    servicer = RouterServicer(service)
    server.add(internal_pb2_grpc.add_RouterServicer_to_server, servicer, "windflow.v1.Router")
    address = await server.start()
    service.leadership = Leadership(
        client,
        config.advertise or address,
        ttl=config.election_ttl_s,
        heartbeat_s=config.election_heartbeat_s,
        on_elected=service.recover_orphans,
    )
    service.leadership.start()
    rebalancer = None
    if config.rebalance_every_s > 0:
        rebalancer = Rebalancer(
            service,
            every_s=config.rebalance_every_s,
            params=RebalanceParams(cooldown_s=config.rebalance_cooldown_s),
            is_leader=service.leads,
        )
        rebalancer.start()
    await server.set_serving()
    log.info("router serving on %s", address)
    try:
        assert service.watch_task is not None
        return await lifecycle.wait_for_stop(service.watch_task)
    finally:
        if rebalancer is not None:
            await rebalancer.aclose()  # its moves in flight abort while the service is up
        await server.aclose()
        await service.leadership.aclose()  # resign: another replica leads at once
        await servicer.aclose()
        await service.aclose()
        await bus.aclose()
        await client.close()
        await exporting.aclose()
        telemetry.shutdown()
