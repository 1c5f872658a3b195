"""Session service process: the durable metadata of sessions."""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.session.config import SessionServiceConfig
from services.session.orchestrator import Orchestrator
from services.session.reclaim import Reclaimer
from services.session.retention import Retention
from services.session.store import SessionStore
from windflow.access.usage import Ledger
from windflow.common import etcd, lifecycle, metrics, telemetry
from windflow.common.durable import CheckpointCatalog, CheckpointStore, ControlLog
from windflow.common.events import EventBus
from windflow.common.grpc_util import ServiceServer
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)


class SessionStoreServicer(internal_pb2_grpc.SessionStoreServicer):
    def __init__(self, store: SessionStore, orchestrator: Orchestrator) -> None:
        self._store = store
        self._orchestrator = orchestrator

    async def Fork(self, request: pb.ForkRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return await self._orchestrator.fork(request)

    async def ForkMany(
        self, request: pb.ForkManyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForkManyResponse:
        return pb.ForkManyResponse(sessions=await self._orchestrator.fork_many(request))

    async def Rewind(
        self, request: pb.RewindRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return await self._orchestrator.rewind(request)

    async def CreateRecord(
        self, request: internal_pb2.SessionRecord, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionRecord:
        return internal_pb2.SessionRecord(session=await self._store.create(request.session))

    async def GetRecord(
        self, request: internal_pb2.GetRecordRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionRecord:
        session = await self._store.get(request.session_id)
        return internal_pb2.SessionRecord(session=await self._orchestrator.describe(session))

    async def UpdateRecord(
        self, request: internal_pb2.SessionRecord, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionRecord:
        return internal_pb2.SessionRecord(session=await self._store.update(request.session))

    async def Close(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        return await self._orchestrator.close(request.session_id)

    async def ListRecords(
        self, request: internal_pb2.ListRecordsRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.ListRecordsResponse:
        records = [internal_pb2.SessionRecord(session=s) for s in await self._store.list()]
        return internal_pb2.ListRecordsResponse(records=records)


async def run(config: SessionServiceConfig) -> int:
    telemetry.setup("windflow-session", config.otlp_endpoint)
    exporting = await metrics.start(
        "windflow-session", listen=config.metrics_listen, otlp_endpoint=config.otlp_endpoint
    )
    client = await etcd.connect(config.etcd)
    bus = EventBus(config.nats, "session")
    await bus.connect()
    if not config.router:
        raise SystemExit("the session service needs --router")
    control_log = ControlLog(bus.jetstream())
    await control_log.ensure()
    store = SessionStore(client, bus)
    orchestrator = Orchestrator(store, control_log, CheckpointCatalog(client), config.router, bus)
    server = ServiceServer(config.listen)
    server.add(
        internal_pb2_grpc.add_SessionStoreServicer_to_server,
        SessionStoreServicer(store, orchestrator),
        "windflow.v1.SessionStore",
    )
    address = await server.start()
    await server.set_serving()
    log.info("session service serving on %s", address)
    serving = asyncio.create_task(server.wait(), name="session-server")
    background = [asyncio.create_task(Ledger(client, bus.jetstream()).run(), name="usage-ledger")]
    if config.retention.every_s > 0:
        retention = Retention(orchestrator, CheckpointStore(bus.jetstream()), bus, config.retention)
        background.append(asyncio.create_task(retention.run(), name="retention"))
    if config.reclaim.enabled:
        reclaimer = Reclaimer(orchestrator, bus, config.reclaim)
        background.append(asyncio.create_task(reclaimer.run(), name="reclaimer"))
    try:
        return await lifecycle.wait_for_stop(serving)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await server.aclose()
        serving.cancel()
        await orchestrator.aclose()
        await bus.aclose()
        await client.close()
        await exporting.aclose()
        telemetry.shutdown()
