"""RouterService's crash recovery, against real etcd, NATS and gRPC workers on port 0.

The workers are small fakes of the real Worker interface (with gRPC health): each answers
what the router asks (health, GetSessionStatus, OpenSession) as its case needs and records
the OpenSession requests it got. The cases follow docs/state.md, "Crash recovery": a
worker that still holds the session keeps it; one alive without it may take it back at a
new epoch; a gone, draining or stalled one is passed over; a placement that moved on is
returned as it is; a refusal passes the session on; a dead worker's sessions move in
parallel, and new placements never wait behind them.

Every case uses its own model id and worker ids, so what other tests leave in the
session-wide etcd never takes part.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from etcd3aio import Etcd3Client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.router.config import RouterConfig
from services.router.service import RouterService
from windflow.common import etcd, names
from windflow.common.events import EventBus
from windflow.infra import EtcdServer, NatsServer
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE_TIMEOUT_S = 0.3
RESUME_FROM = 37

OnOpen = Callable[[internal_pb2.OpenSessionRequest], Awaitable[None]]


class CountingHealth(health.aio.HealthServicer):
    """The real async health servicer, counting the checks it answers (and able to stall)."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0
        self.stall_s = 0.0

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.checks += 1
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        return await super().Check(request, context)


class FakeWorker(internal_pb2_grpc.WorkerServicer):
    """What the router sees of a worker: its registration, health and session RPCs."""

    def __init__(self, worker_id: str, model_id: str, *, sessions: int, capacity: int) -> None:
        self.worker_id = worker_id
        self.model_id = model_id
        self.sessions = sessions
        self.capacity = capacity
        self.address = ""
        self.health = CountingHealth()
        self.held: dict[str, int] = {}
        """Session -> the epoch this worker holds it at (GetSessionStatus: else NOT_FOUND)."""
        self.status_stall_s = 0.0
        self.recovery_delay_s = 0.0
        """How long an OpenSession of a recovery takes (a restore replaying its log)."""
        self.refuse: grpc.StatusCode | None = None
        self.on_open: OnOpen | None = None
        self.opened: list[internal_pb2.OpenSessionRequest] = []
        """Every OpenSession request received, refused ones included, in arrival order."""
        self.accepted: list[str] = []
        """Sessions whose OpenSession completed, in completion order."""
        self.status_asked: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        internal_pb2_grpc.add_WorkerServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await self.health.set("", SERVING)
        self.address = f"127.0.0.1:{port}"
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0)

    def info(self) -> internal_pb2.WorkerInfo:
        return internal_pb2.WorkerInfo(
            worker_id=self.worker_id,
            address=self.address,
            models=[pb.ModelInfo(model_id=self.model_id)],
            capacity=self.capacity,
            sessions=self.sessions,
            load=self.sessions / self.capacity,
        )

    async def OpenSession(
        self, request: internal_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.OpenSessionResponse:
        self.opened.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.on_open is not None:
                await self.on_open(request)
            if request.recovery and self.recovery_delay_s:
                await asyncio.sleep(self.recovery_delay_s)
            if self.refuse is not None:
                await context.abort(self.refuse, f"worker {self.worker_id} refuses on purpose")
        finally:
            self.in_flight -= 1
        self.held[request.session_id] = request.epoch
        self.sessions += 1
        self.accepted.append(request.session_id)
        return internal_pb2.OpenSessionResponse(
            model=pb.ModelInfo(model_id=self.model_id), sessions=self.sessions
        )

    async def GetSessionStatus(
        self, request: internal_pb2.GetSessionStatusRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        self.status_asked.append(request.session_id)
        if self.status_stall_s:
            await asyncio.sleep(self.status_stall_s)
        if request.session_id not in self.held:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id}")
        return internal_pb2.SessionStatus(
            session_id=request.session_id, epoch=self.held[request.session_id]
        )

    async def Rewind(
        self, request: pb.RewindRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")

    async def Replay(
        self, request: internal_pb2.WorkerReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        yield pb.Frame()

    async def Attach(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        yield pb.ServerMessage()

    async def CloseSession(
        self, request: internal_pb2.CloseWorkerSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")


class Cluster:
    """etcd, NATS, fake workers and one RouterService, with what each case needs to say."""

    def __init__(
        self, etcd_server: EtcdServer, nats_server: NatsServer, client: Etcd3Client, bus: EventBus
    ) -> None:
        self._etcd_server = etcd_server
        self._nats_server = nats_server
        self.client = client
        self.bus = bus
        self.tag = uuid.uuid4().hex[:8]
        self.model_id = f"model-{self.tag}"
        self.spec = pb.SessionSpec(model_id=self.model_id, seed=7)
        self.workers: list[FakeWorker] = []
        self.router: RouterService | None = None
        self._keys: list[str] = []

    async def add_worker(self, name: str, *, sessions: int = 0, capacity: int = 4) -> FakeWorker:
        worker = FakeWorker(  # type: ignore[abstract]  # (only the RPCs recovery uses)
            f"{name}-{self.tag}", self.model_id, sessions=sessions, capacity=capacity
        )
        await worker.start()
        self.workers.append(worker)
        await self.register(worker)
        return worker

    async def register(self, worker: FakeWorker) -> None:
        key = names.worker_key(worker.worker_id)
        self._keys.append(key)
        await etcd.kv(self.client).put(key, worker.info().SerializeToString())

    async def deregister(self, worker: FakeWorker) -> None:
        """Its key goes, as when its lease ends: the router's watch sees a DELETE."""
        await etcd.kv(self.client).delete(names.worker_key(worker.worker_id))

    async def start_router(self, *, recover_concurrency: int = 8) -> RouterService:
        config = RouterConfig(
            etcd=self._etcd_server.endpoint,
            nats=self._nats_server.url,
            probe_timeout_s=PROBE_TIMEOUT_S,
            open_timeout_s=5.0,
            recover_concurrency=recover_concurrency,
        )
        self.router = RouterService(config, self.client, self.bus)
        await self.router.start()
        return self.router

    def session_id(self, name: str = "s") -> str:
        return f"{name}-{self.tag}"

    async def place_record(self, session_id: str, worker: FakeWorker, epoch: int) -> None:
        key = names.placement_key(session_id)
        self._keys.append(key)
        record = internal_pb2.PlacementRecord(
            worker_id=worker.worker_id,
            worker_address=worker.address,
            epoch=epoch,
            spec=self.spec,
        )
        await etcd.kv(self.client).put(key, record.SerializeToString())

    async def record(self, session_id: str) -> internal_pb2.PlacementRecord:
        current = await etcd.kv(self.client).get(names.placement_key(session_id))
        assert current.kvs, f"session {session_id} has no placement record"
        return internal_pb2.PlacementRecord.FromString(current.kvs[0].value)

    async def placed(self, session_id: str) -> tuple[str, int]:
        record = await self.record(session_id)
        return record.worker_id, record.epoch

    async def aclose(self) -> None:
        if self.router is not None:
            await self.router.aclose()
        for worker in self.workers:
            await worker.stop()
        for key in self._keys:
            await etcd.kv(self.client).delete(key)
        await self.bus.aclose()
        await self.client.close()


@pytest.fixture
async def cluster(etcd_server: EtcdServer, nats_server: NatsServer) -> AsyncIterator[Cluster]:
    client = await etcd.connect(etcd_server.endpoint)
    bus = EventBus(nats_server.url, "router-recover-test")
    await bus.connect()
    cluster = Cluster(etcd_server, nats_server, client, bus)
    try:
        yield cluster
    finally:
        await cluster.aclose()


def recover_request(
    session_id: str, worker: FakeWorker, epoch: int, *, resume: bool = True
) -> internal_pb2.RecoverRequest:
    return internal_pb2.RecoverRequest(
        session_id=session_id,
        worker_id=worker.worker_id,
        epoch=epoch,
        resume=resume,
        resume_from=RESUME_FROM if resume else 0,
    )


def summary(request: internal_pb2.OpenSessionRequest) -> tuple[object, ...]:
    """What a recovery's OpenSession must say: whose, which epoch, and how to restore."""
    return (
        request.session_id,
        request.epoch,
        request.recovery,
        request.restore,
        request.restore_to,
        request.restore_latest,
    )


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---- a client's Recover ----


async def test_worker_that_still_holds_the_session_keeps_it(cluster: Cluster) -> None:
    placed = await cluster.add_worker("w1")
    other = await cluster.add_worker("w2")
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, placed, epoch=3)
    placed.held[sid] = 3

    placement = await router.recover(recover_request(sid, placed, 3))

    assert (placement.worker_id, placement.worker_address, placement.epoch) == (
        placed.worker_id,
        placed.address,
        3,
    )
    assert await cluster.placed(sid) == (placed.worker_id, 3)
    assert placed.status_asked == [sid]  # it was asked, not assumed
    assert placed.opened == [] and other.opened == []


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-client-position"])
@pytest.mark.parametrize("without_it", ["not-found", "older-epoch"])
async def test_worker_alive_without_the_session_may_take_it_back_at_a_new_epoch(
    cluster: Cluster, resume: bool, without_it: str
) -> None:
    # The placed worker is the best choice (the other is busier): a worker that is alive
    # but dropped the session is not excluded, so the session goes back to it.
    placed = await cluster.add_worker("w1", sessions=0)
    other = await cluster.add_worker("w2", sessions=2)
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, placed, epoch=3)
    if without_it == "older-epoch":
        placed.held[sid] = 2  # a stale copy: the placement moved on from it once

    placement = await router.recover(recover_request(sid, placed, 3, resume=resume))

    assert (placement.worker_id, placement.epoch) == (placed.worker_id, 4)
    assert placement.model.model_id == cluster.model_id
    record = await cluster.record(sid)
    assert (record.worker_id, record.worker_address, record.epoch) == (
        placed.worker_id,
        placed.address,
        4,
    )
    assert record.spec == cluster.spec
    restore = (True, RESUME_FROM, False) if resume else (False, 0, True)
    assert [summary(r) for r in placed.opened] == [(sid, 4, True, *restore)]
    assert placed.opened[0].spec == cluster.spec
    assert other.opened == []


@pytest.mark.parametrize("gone", ["stopped", "draining", "stalled"])
async def test_gone_worker_is_passed_over(cluster: Cluster, gone: str) -> None:
    # The placed worker would be the best choice by load: only the exclusion keeps the
    # session off it (and a try there first would cost an epoch).
    placed = await cluster.add_worker("w1", sessions=0)
    other = await cluster.add_worker("w2", sessions=2)
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, placed, epoch=3)
    placed.held[sid] = 3  # a draining or stalled worker still has it, and cannot serve it
    if gone == "stopped":
        await placed.stop()
    elif gone == "draining":
        await placed.health.set("", NOT_SERVING)
    else:
        placed.status_stall_s = 5.0

    started = time.monotonic()
    placement = await router.recover(recover_request(sid, placed, 3))
    took = time.monotonic() - started

    assert (placement.worker_id, placement.worker_address, placement.epoch) == (
        other.worker_id,
        other.address,
        4,
    )
    assert await cluster.placed(sid) == (other.worker_id, 4)
    assert [summary(r) for r in other.opened] == [(sid, 4, True, True, RESUME_FROM, False)]
    assert placed.opened == []
    assert took < 3 * PROBE_TIMEOUT_S  # a stall costs the probe, not the stall


async def test_placement_that_moved_on_is_returned_untouched(cluster: Cluster) -> None:
    old = await cluster.add_worker("w1")
    current = await cluster.add_worker("w2")
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, current, epoch=5)
    before = (await etcd.kv(cluster.client).get(names.placement_key(sid))).kvs[0]

    placement = await router.recover(recover_request(sid, old, 4))

    assert (placement.worker_id, placement.worker_address, placement.epoch) == (
        current.worker_id,
        current.address,
        5,
    )
    after = (await etcd.kv(cluster.client).get(names.placement_key(sid))).kvs[0]
    assert (after.mod_revision, after.value) == (before.mod_revision, before.value)
    assert old.status_asked == [] and current.status_asked == []
    assert old.opened == [] and current.opened == []


async def test_refusals_pass_the_session_on_each_at_a_new_epoch(cluster: Cluster) -> None:
    placed = await cluster.add_worker("w0", sessions=0)
    first = await cluster.add_worker("w1", sessions=0)  # the best choice: it refuses
    second = await cluster.add_worker("w2", sessions=1)  # next: it refuses too
    third = await cluster.add_worker("w3", sessions=2)  # last: it accepts
    first.refuse = second.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, placed, epoch=3)
    await placed.stop()

    # The placement moves before each OpenSession: every worker asked sees itself named
    # at the epoch it is asked to open under.
    seen: list[tuple[str, str, int]] = []

    def remember(worker: FakeWorker) -> OnOpen:
        async def on_open(request: internal_pb2.OpenSessionRequest) -> None:
            seen.append((worker.worker_id, *await cluster.placed(request.session_id)))

        return on_open

    for worker in (first, second, third):
        worker.on_open = remember(worker)

    placement = await router.recover(recover_request(sid, placed, 3))

    assert (placement.worker_id, placement.epoch) == (third.worker_id, 6)
    assert await cluster.placed(sid) == (third.worker_id, 6)
    assert [r.epoch for r in first.opened] == [4]
    assert [r.epoch for r in second.opened] == [5]
    assert [summary(r) for r in third.opened] == [(sid, 6, True, True, RESUME_FROM, False)]
    assert seen == [
        (first.worker_id, first.worker_id, 4),
        (second.worker_id, second.worker_id, 5),
        (third.worker_id, third.worker_id, 6),
    ]
    assert placed.opened == []


# ---- a dead worker's lease ends: its sessions move without a client ----


async def test_dead_workers_sessions_move_in_parallel_and_new_placements_do_not_wait(
    cluster: Cluster,
) -> None:
    dead = await cluster.add_worker("dead", sessions=6, capacity=8)
    target = await cluster.add_worker("target", sessions=1, capacity=16)
    # Only a recovery's OpenSession is slow (it restores): a new session's is quick, so a
    # Place that finishes while the recoveries are still restoring did not wait for them.
    target.recovery_delay_s = 0.3
    router = await cluster.start_router(recover_concurrency=8)
    orphans = [cluster.session_id(f"orphan{i}") for i in range(6)]
    for sid in orphans:
        await cluster.place_record(sid, dead, epoch=1)
    bystander = cluster.session_id("bystander")
    await cluster.place_record(bystander, target, epoch=1)
    target.held[bystander] = 1

    await dead.stop()
    started = time.monotonic()
    await cluster.deregister(dead)

    async def recovering() -> bool:
        return len(target.opened) > 0

    await wait_until(recovering, timeout_s=5.0)
    fresh = cluster.session_id("fresh")
    placement = await router.place(internal_pb2.PlaceRequest(session_id=fresh, spec=cluster.spec))
    recovered_when_placed = [s for s in target.accepted if s in orphans]

    assert (placement.worker_id, placement.epoch) == (target.worker_id, 1)
    assert len(recovered_when_placed) < len(orphans), "the Place waited for the recoveries"

    async def all_moved() -> bool:
        # the record moves first; a session is moved once its new worker opened it
        opened = set(orphans) <= set(target.accepted)
        records = [await cluster.placed(s) for s in orphans]
        return opened and records == [(target.worker_id, 2)] * len(orphans)

    await wait_until(all_moved, timeout_s=5.0)
    took = time.monotonic() - started
    assert took < 1.2, f"6 recoveries of 0.3 s each took {took:.2f} s: not in parallel"
    assert target.max_in_flight >= len(orphans)
    recoveries = sorted(summary(r) for r in target.opened if r.recovery)
    assert recoveries == [(s, 2, True, False, 0, True) for s in sorted(orphans)]
    assert [summary(r) for r in target.opened if not r.recovery] == [
        (fresh, 1, False, False, 0, False)
    ]
    assert dead.opened == []
    assert await cluster.placed(bystander) == (target.worker_id, 1)


async def test_dead_workers_sessions_move_at_most_recover_concurrency_at_once(
    cluster: Cluster,
) -> None:
    dead = await cluster.add_worker("dead", sessions=6, capacity=8)
    target = await cluster.add_worker("target", capacity=16)
    target.recovery_delay_s = 0.1
    await cluster.start_router(recover_concurrency=2)
    orphans = [cluster.session_id(f"orphan{i}") for i in range(6)]
    for sid in orphans:
        await cluster.place_record(sid, dead, epoch=1)

    await dead.stop()
    await cluster.deregister(dead)

    async def all_moved() -> bool:
        # the record moves first; a session is moved once its new worker opened it
        opened = set(orphans) <= set(target.accepted)
        records = [await cluster.placed(s) for s in orphans]
        return opened and records == [(target.worker_id, 2)] * len(orphans)

    await wait_until(all_moved, timeout_s=5.0)
    assert target.max_in_flight == 2
    assert sorted(target.accepted) == sorted(orphans)


async def test_lease_lapsed_on_a_live_worker_keeps_its_sessions(cluster: Cluster) -> None:
    alive = await cluster.add_worker("alive")
    spare = await cluster.add_worker("spare")
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, alive, epoch=1)
    alive.held[sid] = 1
    checks_before = alive.health.checks

    await cluster.deregister(alive)

    async def probed() -> bool:
        return alive.worker_id not in router.workers and alive.health.checks > checks_before

    await wait_until(probed, timeout_s=5.0)
    await asyncio.sleep(0.2)  # what a move would take here: an etcd write and an OpenSession
    assert await cluster.placed(sid) == (alive.worker_id, 1)
    assert spare.opened == [] and alive.opened == []


# ---- a worker registered again under its id at another address ----


async def test_worker_registered_again_at_a_new_address_is_reached_there(cluster: Cluster) -> None:
    before = await cluster.add_worker("w1")
    router = await cluster.start_router()
    sid = cluster.session_id()
    await cluster.place_record(sid, before, epoch=1)
    before.held[sid] = 1
    await router.recover(recover_request(sid, before, 1))  # the router has talked to it

    # It restarts at another address and registers again before its old lease ran out
    # (the key is put again, never deleted: the watch sees a PUT).
    await before.stop()
    after = FakeWorker(before.worker_id, cluster.model_id, sessions=0, capacity=4)  # type: ignore[abstract]
    await after.start()
    cluster.workers.append(after)
    await cluster.register(after)

    async def seen() -> bool:
        view = router.workers.get(after.worker_id)
        return view is not None and view.address == after.address

    await wait_until(seen, timeout_s=5.0)
    fresh = cluster.session_id("fresh")
    placement = await router.place(internal_pb2.PlaceRequest(session_id=fresh, spec=cluster.spec))

    assert (placement.worker_id, placement.worker_address) == (after.worker_id, after.address)
    assert [r.session_id for r in after.opened] == [fresh]
