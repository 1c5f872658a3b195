"""Worker process: load models, serve the Worker API, register in etcd under a lease."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

import grpc

from services.worker.config import WorkerConfig
from services.worker.journal import Journal
from services.worker.metering import UsagePublisher
from services.worker.model_host import ModelHost, exit_worker
from services.worker.models.base import WorldModel
from services.worker.models.registry import load_model
from services.worker.runtime import WorkerRuntime
from services.worker.servicer import WorkerServicer
from windflow.access.usage import UsageLog
from windflow.common import etcd, grpc_util, lifecycle, metrics, names, telemetry
from windflow.common.durable import (
    CheckpointCatalog,
    CheckpointStore,
    ControlLog,
    DeliveredHeads,
    InputStore,
)
from windflow.common.events import EventBus
from windflow.common.grpc_util import ServiceServer
from windflow.common.malloc import keep_freed_memory
from windflow.v1 import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)


async def run(config: WorkerConfig) -> int:
    telemetry.setup(f"windflow-worker-{config.worker_id}", config.otlp_endpoint)
    exporting = await metrics.start(
        f"windflow-worker-{config.worker_id}",
        listen=config.metrics_listen,
        otlp_endpoint=config.otlp_endpoint,
    )
    sys.setswitchinterval(config.gil_switch_interval_ms / 1000.0)
    keep_freed_memory()  # model steps reuse their buffers instead of faulting in fresh pages
    models: dict[str, WorldModel] = {}
    hosts: list[ModelHost] = []
    for model_id in config.models:
        if config.model_process:
            host = await asyncio.to_thread(ModelHost, model_id, threads=config.step_threads)
            hosts.append(host)
            models[model_id] = host
        else:
            models[model_id] = await asyncio.to_thread(load_model, model_id)
        log.info(
            "loaded model %s (%s)%s",
            model_id,
            models[model_id].info.version,
            f" in model host pid {hosts[-1].process.pid}" if config.model_process else "",
        )
    # A model host that dies takes the worker down with it (model_host.exit_worker).
    watchers = [asyncio.create_task(_watch(h), name=f"model-host:{h.model_id}") for h in hosts]

    client = await etcd.connect(config.etcd)
    bus = EventBus(config.nats, f"worker-{config.worker_id}")
    await bus.connect()
    registration = etcd.LeasedKey(
        client, names.worker_key(config.worker_id), config.lease_ttl_s, config.heartbeat_s
    )
    pending_updates: set[asyncio.Task[None]] = set()

    def on_change() -> None:
        task = asyncio.create_task(
            registration.update(runtime.info().SerializeToString()), name="registration-update"
        )
        pending_updates.add(task)
        task.add_done_callback(pending_updates.discard)

    js = bus.jetstream()
    control_log = ControlLog(js)
    await control_log.ensure()
    journal = Journal(
        config.worker_id,
        control_log,
        CheckpointStore(js),
        CheckpointCatalog(client),
        checkpoint_every=config.checkpoint_every,
        heads=DeliveredHeads(client),
        memory_every=config.memory_snapshot_every,
        memory_keep=config.memory_snapshots,
        memory_budget_bytes=int(config.memory_snapshot_mb * 2**20),
        inputs=InputStore(js),
    )
    runtime = WorkerRuntime(config, models, on_change, journal)
    usage_log = UsageLog(js)
    await usage_log.ensure()
    runtime.usage = UsagePublisher(usage_log)
    runtime.usage.start()
    server = ServiceServer(config.listen)
    server.add(
        internal_pb2_grpc.add_WorkerServicer_to_server,
        WorkerServicer(runtime),
        "windflow.v1.Worker",
    )
    bound = await server.start()
    runtime.address = config.advertise or bound
    engine_task = runtime.start()
    await runtime.engine.calibrate()  # step costs for fps-aware admission, before registering
    await registration.start(runtime.info().SerializeToString())
    await server.set_serving()
    await bus.publish(names.SUBJECT_WORKER_UP, worker_id=config.worker_id, detail=runtime.address)
    log.info("worker %s serving on %s", config.worker_id, runtime.address)

    async def placement_of(session_id: str) -> internal_pb2.PlacementRecord | None:
        response = await etcd.kv(client).get(names.placement_key(session_id))
        if not response.kvs:
            return None
        return internal_pb2.PlacementRecord.FromString(response.kvs[0].value)

    runtime.migrations.placement_of = placement_of
    runtime.engine.lease = lambda: (registration.grants, registration.valid_until)
    runtime.engine.verified_grant = registration.grants  # nothing placed before it
    runtime.engine.verify_placements = lambda: runtime.check_placements(placement_of)
    checker = asyncio.create_task(
        _check_placements(runtime, placement_of, config.placement_check_s),
        name="placement-check",
    )
    try:
        return await lifecycle.wait_for_stop(engine_task, *watchers)
    finally:
        # A drain: health NOT_SERVING (the router reads it as gone when a client reports
        # the worker), no new sessions, the attached streams end with UNAVAILABLE and the
        # gateway moves their sessions (WorkerRuntime.drain); then the registration goes,
        # and the router moves the sessions with no stream attached.
        checker.cancel()
        await _drain_by_migration(runtime, config)
        await server.set_not_serving()
        await runtime.drain()
        # the drain's own update (no free slot) lands before the lease goes, not after it
        await asyncio.gather(*pending_updates, return_exceptions=True)
        await registration.aclose()
        await bus.publish(names.SUBJECT_WORKER_DOWN, worker_id=config.worker_id, detail="stopped")
        await server.aclose()
        await runtime.aclose()
        await runtime.usage.aclose()
        for host in hosts:
            await asyncio.to_thread(host.close)
        await bus.aclose()
        await client.close()
        await exporting.aclose()
        telemetry.shutdown()


async def _watch(host: ModelHost) -> None:
    await asyncio.to_thread(host.wait_exit)
    if host.lost:
        exit_worker(host)


async def _check_placements(
    runtime: WorkerRuntime,
    placement_of: Callable[[str], Awaitable[internal_pb2.PlacementRecord | None]],
    every_s: float,
) -> None:
    """``WorkerRuntime.check_placements`` every ``every_s`` (0: never), until cancelled."""
    if every_s <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            await runtime.check_placements(placement_of)
        except Exception:
            log.warning("placement check failed (etcd unreachable?)", exc_info=True)


async def _drain_by_migration(runtime: WorkerRuntime, config: WorkerConfig) -> None:
    """Before a graceful stop: ask the router to move every session away by live
    migration (no client sees a stall), within ``drain_deadline_s``. What is left (no
    router, no other worker for a model, the deadline) goes as after a crash."""
    if not config.router or not runtime.session_count or config.drain_deadline_s <= 0:
        return
    log.info(
        "draining %d session(s) by live migration (deadline %.0f s)",
        runtime.session_count,
        config.drain_deadline_s,
    )
    request = internal_pb2.DrainRequest(
        worker_id=config.worker_id, deadline_s=config.drain_deadline_s
    )
    try:
        async with grpc_util.channel(config.router) as channel:
            call = internal_pb2_grpc.RouterStub(channel).Drain(
                request, timeout=config.drain_deadline_s + 5.0
            )
            async for progress in call:
                if progress.done:
                    log.info(
                        "drain: %d of %d migrated%s",
                        progress.migrated,
                        progress.sessions,
                        f" ({progress.detail})" if progress.detail != "drained" else "",
                    )
    except grpc.aio.AioRpcError as exc:
        log.warning("drain by live migration failed (%s): %s", exc.code().name, exc.details())
