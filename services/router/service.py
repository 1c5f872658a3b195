"""The router's actor: a live worker table from etcd, and placement by compare-and-swap.

Lifecycle: construct -> ``await start()`` (loads the table, starts the watch) -> ``place``
-> ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator

import grpc
from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.kv import Compare
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.router.config import RouterConfig
from services.router.leader import Leadership
from services.router.migration import Migrator
from services.router.placement import Demand, WorkerView, choose_worker
from windflow.common import etcd, grpc_util, metrics, names, telemetry
from windflow.common.events import EventBus
from windflow.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WindflowError,
)
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


class Holding(enum.Enum):
    """What a session's placed worker says of it (``RouterService._holding``)."""

    HOLDS = "holds"
    LOST = "lost"
    """Alive and serving, without the session (it dropped it)."""
    GONE = "gone"
    """Dead, stalled past the probe, or draining."""


def _view(info: internal_pb2.WorkerInfo) -> WorkerView:
    return WorkerView(
        worker_id=info.worker_id,
        address=info.address,
        region=info.region,
        models=frozenset(m.model_id for m in info.models),
        capacity=info.capacity,
        sessions=info.sessions,
        headroom={(h.model_id, h.steps): h.fps for h in info.headroom}
        if info.fps_admission
        else {},
        utilization=info.utilization if info.fps_admission else None,
        draining=info.draining,
    )


def demand_of(spec: pb.SessionSpec) -> Demand:
    """What placing ``spec`` takes from a worker: its fps at its floor, or for a lockstep
    session none (it takes the step time interactive sessions leave: a slot only)."""
    return Demand(
        model_id=spec.model_id,
        fps=0.0 if spec.session_class == pb.SESSION_CLASS_LOCKSTEP else spec.fps,
        steps=spec.steps,
        min_steps=spec.quality.min_steps,
        adaptive=spec.quality.mode != pb.QualityPolicy.MODE_FIXED,
    )


class RouterService:
    def __init__(self, config: RouterConfig, client: Etcd3Client, bus: EventBus) -> None:
        self.config = config
        self.etcd = client
        self.bus = bus
        self.workers: dict[str, WorkerView] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.watch_task: asyncio.Task[None] | None = None
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        """Per session being moved: its lock and how many hold or wait for it."""
        self._recoveries: set[asyncio.Task[None]] = set()
        self.migrator = Migrator(self)
        self.leadership: Leadership | None = None
        """This replica's part in the router election (None: it runs alone and leads)."""
        self._metrics = metrics.get()
        self._metrics.router_leader.add(lambda: [(1.0 if self.leads() else 0.0, {})])
        self._metrics.workers.add(self._worker_counts)
        for outcome in ("placed", "failed"):  # (every series shows from the start)
            self._metrics.placements.add(0, {"outcome": outcome})
            for kind in ("crash", "unpark"):
                self._metrics.recoveries.add(0, {"kind": kind, "outcome": outcome})
        for outcome in ("done", "aborted", "refused"):
            self._metrics.migrations.add(0, {"outcome": outcome})

    def _worker_counts(self) -> list[tuple[float, metrics.Attributes]]:
        draining = sum(1 for w in list(self.workers.values()) if w.draining)
        live = len(self.workers) - draining
        return [(live, {"state": "live"}), (draining, {"state": "draining"})]

    async def start(self) -> None:
        prefix = names.WORKERS_PREFIX.encode()
        response = await etcd.kv(self.etcd).get(prefix, prefix_range_end(prefix))
        for item in response.kvs:
            info = internal_pb2.WorkerInfo.FromString(item.value)
            self.workers[info.worker_id] = _view(info)
        self.watch_task = asyncio.create_task(
            self._watch(response.header.revision + 1), name="router-worker-watch"
        )

    async def _watch(self, start_revision: int) -> None:
        assert self.etcd.watch is not None
        prefix = names.WORKERS_PREFIX.encode()
        async for response in self.etcd.watch.watch(
            prefix, prefix_range_end(prefix), start_revision=start_revision
        ):
            for event in response.events:
                worker_id = event.kv.key.decode()[len(names.WORKERS_PREFIX) :]
                if event.type == event.PUT:
                    info = internal_pb2.WorkerInfo.FromString(event.kv.value)
                    known = self.workers.get(worker_id)
                    if known is None:
                        log.info("worker %s up at %s", worker_id, info.address)
                    elif known.address != info.address:
                        # restarted elsewhere and registered again before its old lease
                        # ended (no DELETE came): the cached channel dials the old address
                        log.info("worker %s moved to %s", worker_id, info.address)
                        stale = self._channels.pop(worker_id, None)
                        if stale is not None:
                            await stale.close()
                    self.workers[worker_id] = _view(info)
                else:
                    gone = self.workers.pop(worker_id, None)
                    log.warning("worker %s down (its lease ended)", worker_id)
                    channel = self._channels.pop(worker_id, None)
                    if channel is not None:
                        await channel.close()
                    if gone is not None:
                        await self.bus.publish(
                            names.SUBJECT_WORKER_DOWN, worker_id=worker_id, detail="lease expired"
                        )
                    if self.leads():  # (a new leader recovers what it finds orphaned)
                        self._spawn_recovery(worker_id, gone)

    def leads(self) -> bool:
        return self.leadership is None or self.leadership.holds()

    def fence(self) -> list[Compare]:
        """The compares that make a placement write this replica's only while it leads
        (``Leadership.fence``): none when it runs alone."""
        return [] if self.leadership is None else [self.leadership.fence()]

    async def write_placement(
        self,
        key: str,
        version: int,
        record: internal_pb2.PlacementRecord,
        *,
        changed: str,
    ) -> None:
        """Put ``record`` at ``key`` if the key is still at ``version`` and this replica
        still leads (``fence``), in one transaction. Raises FailedPrecondition(``changed``)
        when the key moved on, Unavailable when the leadership lapsed."""
        kvs = etcd.kv(self.etcd)
        swapped = await kvs.txn(
            compare=[kvs.txn_compare_version(key, version), *self.fence()],
            success=[kvs.txn_op_put(key, record.SerializeToString())],
        )
        if swapped.succeeded:
            return
        if not self.leads():
            raise Unavailable(
                "this router's leadership lapsed; the new leader serves it", retry_after_s=0.5
            )
        raise FailedPrecondition(changed)

    async def recover_orphans(self) -> None:
        """On election: re-place the sessions placed on workers not in the table (they
        died while no replica led, or before this one watched)."""
        records = (await self.placements()).values()
        for worker_id in {r.worker_id for r in records if r.worker_id not in self.workers}:
            self._spawn_recovery(worker_id, None)

    def _spawn_recovery(self, worker_id: str, last_seen: WorkerView | None) -> None:
        task = asyncio.create_task(
            self._recover_worker(worker_id, last_seen), name=f"recover-worker:{worker_id}"
        )
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    def stub(self, worker: WorkerView) -> internal_pb2_grpc.WorkerStub:
        channel = self._channels.get(worker.worker_id)
        if channel is None:
            channel = grpc_util.channel(worker.address)
            self._channels[worker.worker_id] = channel
        return internal_pb2_grpc.WorkerStub(channel)

    async def place(self, request: internal_pb2.PlaceRequest) -> internal_pb2.Placement:
        with tracer.start_as_current_span(
            names.SPAN_ROUTER_PLACE, attributes={"windflow.session_id": request.session_id}
        ):
            async with self.session_lock(request.session_id):
                try:
                    placement = await self._place(request)
                except BaseException:
                    self._metrics.placements.add(1, {"outcome": "failed"})
                    raise
                self._metrics.placements.add(1, {"outcome": "placed"})
                return placement

    @contextlib.asynccontextmanager
    async def session_lock(self, session_id: str) -> AsyncIterator[None]:
        """Moves of one session go one at a time (a client's Recover and a lease expiry
        may race); sessions never wait for each other."""
        lock, users = self._locks.get(session_id, (asyncio.Lock(), 0))
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    async def recover(self, request: internal_pb2.RecoverRequest) -> internal_pb2.Placement:
        """A client's stream to the session's worker broke: say where to attach now.

        The worker still holding the session at its epoch: attach there again. Alive but
        without it (it dropped the session: a fence, a failed step), or gone, or draining:
        re-place it (a gone or draining worker is excluded), restored at the client's
        ``resume_from``. Already moved on: the new placement."""
        async with self.session_lock(request.session_id):
            record = await self._placement(request.session_id)
            if record.parked:
                # parked (docs/access.md): restored wherever there is room, at the client's
                # resume point or (no client) at the head it was checkpointed at
                return await self._recover(
                    request.session_id,
                    record,
                    exclude=(),
                    resume_from=request.resume_from if request.resume else None,
                )
            if record.epoch != request.epoch or record.worker_id != request.worker_id:
                return _as_placement(request.session_id, record)  # already moved on
            worker = self.workers.get(record.worker_id)
            holding = (
                Holding.GONE
                if worker is None
                else await self._holding(worker, request.session_id, record.epoch)
            )
            if holding is Holding.HOLDS:
                log.info(
                    "session %s: worker %s still holds it; the client re-attaches there",
                    request.session_id,
                    record.worker_id,
                )
                return _as_placement(request.session_id, record)
            exclude: tuple[str, ...] = ()
            if holding is Holding.GONE:
                self.workers.pop(record.worker_id, None)  # back when it registers again
                exclude = (record.worker_id,)
            try:
                return await self._recover(
                    request.session_id,
                    record,
                    exclude=exclude,
                    resume_from=request.resume_from if request.resume else None,
                )
            except NotFound as err:
                # The session outlives its worker: none serves its model this moment (the
                # only worker restarting, a lease between expiry and renewal), so the
                # client waits for one, up to its recovery deadline, rather than losing it.
                raise Unavailable(
                    f"{err.message} now; session {request.session_id} waits for one",
                    retry_after_s=self.config.recover_retry_s,
                ) from err

    async def _placement(self, session_id: str) -> internal_pb2.PlacementRecord:
        current = await etcd.kv(self.etcd).get(names.placement_key(session_id))
        if not current.kvs:
            raise NotFound(f"session {session_id!r} is not placed")
        return internal_pb2.PlacementRecord.FromString(current.kvs[0].value)

    async def _answers(self, worker: WorkerView) -> bool:
        async with grpc_util.channel(worker.address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=self.config.probe_timeout_s
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _holding(self, worker: WorkerView, session_id: str, epoch: int) -> Holding:
        """Does ``worker`` (the session's placement) still serve the session at its epoch?"""
        if not await self._answers(worker):
            return Holding.GONE  # dead, stalled past the probe, or draining
        try:
            status = await self.stub(worker).GetSessionStatus(
                internal_pb2.GetSessionStatusRequest(session_id=session_id),
                timeout=self.config.probe_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return Holding.LOST
            return Holding.GONE
        return Holding.HOLDS if status.epoch == epoch else Holding.LOST

    async def _recover(
        self,
        session_id: str,
        record: internal_pb2.PlacementRecord,
        *,
        exclude: tuple[str, ...],
        resume_from: int | None,
    ) -> internal_pb2.Placement:
        if record.parked:
            log.info("unparking session %s (parked at frame %d)", session_id, record.parked_head)
        else:
            log.warning(
                "recovering session %s from worker %s (%s)",
                session_id,
                record.worker_id,
                "gone" if exclude else "alive, without it",
            )
        kind = "unpark" if record.parked else "crash"
        try:
            placement = await self._place(
                internal_pb2.PlaceRequest(
                    session_id=session_id,
                    spec=record.spec,
                    restore=resume_from is not None,
                    restore_to=resume_from or 0,
                ),
                restore_latest=resume_from is None,
                recovery=True,
                exclude=exclude,
            )
        except BaseException:
            self._metrics.recoveries.add(1, {"kind": kind, "outcome": "failed"})
            raise
        self._metrics.recoveries.add(1, {"kind": kind, "outcome": "placed"})
        await self.bus.publish(
            names.SUBJECT_SESSION_RECOVERED,
            session_id=session_id,
            worker_id=placement.worker_id,
            epoch=placement.epoch,
            detail=f"from {record.worker_id}",
        )
        return placement

    async def _recover_worker(self, worker_id: str, last_seen: WorkerView | None) -> None:
        """Re-place every session the dead ``worker_id`` held (its lease expired), at
        most ``recover_concurrency`` at once.

        A worker whose lease lapsed while it still serves (a stall longer than the lease,
        on a loaded host) keeps its sessions: it registers again at its next heartbeat, and
        moving them would fork each attached stream between two workers."""
        if last_seen is not None and await self._answers(last_seen):
            log.warning(
                "worker %s lost its lease but still answers; its sessions stay on it", worker_id
            )
            return
        orphans = await self.placed_on(worker_id)
        limit = asyncio.Semaphore(max(1, self.config.recover_concurrency))

        async def recover_one(session_id: str) -> None:
            async with limit, self.session_lock(session_id):
                try:
                    current = await self._placement(session_id)
                    if current.worker_id != worker_id:
                        return  # a client-driven recovery got there first
                    await self._recover(session_id, current, exclude=(worker_id,), resume_from=None)
                except WindflowError as err:
                    log.error("could not recover session %s: %s", session_id, err.message)

        await asyncio.gather(*(recover_one(s) for s in orphans))

    async def placements(self) -> dict[str, internal_pb2.PlacementRecord]:
        """The record of every session placed on a worker, by session id (one range read;
        parked sessions are on none)."""
        prefix = names.SESSIONS_PREFIX.encode()
        response = await etcd.kv(self.etcd).get(prefix, prefix_range_end(prefix))
        placed = {}
        for item in response.kvs:
            if item.key.endswith(b"/placement"):
                session_id = item.key.decode()[len(names.SESSIONS_PREFIX) :].split("/")[0]
                record = internal_pb2.PlacementRecord.FromString(item.value)
                if not record.parked:
                    placed[session_id] = record
        return placed

    async def placed_on(self, worker_id: str) -> list[str]:
        """The sessions whose placement names ``worker_id``."""
        return [s for s, r in (await self.placements()).items() if r.worker_id == worker_id]

    async def _place(
        self,
        request: internal_pb2.PlaceRequest,
        *,
        restore_latest: bool = False,
        recovery: bool = False,
        exclude: tuple[str, ...] = (),
    ) -> internal_pb2.Placement:
        """Choose a worker, move the placement to it (compare-and-swap, epoch + 1), then
        open the session there under that epoch. The placement moves first: the epoch
        fences the previous owner (its checkpoints, and its log once the new owner claims
        it) before anything else happens, and a placement whose CAS lost never opened or
        claimed anything. A worker that refuses passes the session on to the next, each
        with a new epoch; if none takes a new session, its placement goes again."""
        key = names.placement_key(request.session_id)
        kvs = etcd.kv(self.etcd)
        current = await kvs.get(key)
        version = current.kvs[0].version if current.kvs else 0
        previous = None
        if current.kvs:
            previous = internal_pb2.PlacementRecord.FromString(current.kvs[0].value)
        epoch = 0 if previous is None else previous.epoch
        tried: list[str] = list(exclude)
        prefer = ""
        if request.affinity_session_id:
            with contextlib.suppress(NotFound):
                prefer = (await self._placement(request.affinity_session_id)).worker_id
        demand = demand_of(request.spec)
        last_error: WindflowError | None = None
        for _ in range(self.config.place_attempts):
            try:
                worker = choose_worker(
                    self.workers.values(),
                    request.spec.model_id,
                    request.spec.region,
                    tried,
                    prefer,
                    # a recovery is not a new admission: slots alone (see the worker)
                    demand=None if recovery else demand,
                )
            except (NotFound, ResourceExhausted):
                if last_error is None:
                    await self._unplace(key, version, previous, epoch)
                    raise
                break
            tried.append(worker.worker_id)
            # the slot is taken in the table before the first await: concurrent
            # placements (recoveries run in parallel) see it
            self.workers[worker.worker_id] = dataclasses.replace(
                worker.admit(demand), sessions=worker.sessions + 1
            )
            epoch += 1
            record = internal_pb2.PlacementRecord(
                worker_id=worker.worker_id,
                worker_address=worker.address,
                epoch=epoch,
                spec=request.spec,
                region=worker.region,
            )
            try:
                await self.write_placement(
                    key,
                    version,
                    record,
                    changed=f"placement of session {request.session_id} changed concurrently; "
                    "retry",
                )
            except WindflowError:
                self._release_slot(worker)
                raise
            version += 1  # each write of a key adds one to its version
            try:
                opened = await self.stub(worker).OpenSession(
                    internal_pb2.OpenSessionRequest(
                        session_id=request.session_id,
                        spec=request.spec,
                        epoch=epoch,
                        restore=request.restore,
                        restore_to=request.restore_to,
                        restore_latest=restore_latest,
                        source_session_id=request.affinity_session_id,
                        recovery=recovery,
                    ),
                    timeout=self.config.open_timeout_s,
                    metadata=telemetry.inject_metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                self._release_slot(worker)
                last_error = grpc_util.error_from_rpc(exc)
                log.warning(
                    "worker %s refused session %s: %s",
                    worker.worker_id,
                    request.session_id,
                    last_error.message,
                )
                if isinstance(last_error, (ResourceExhausted, Unavailable)):
                    continue
                await self._unplace(key, version, previous, epoch)
                raise last_error from exc
            view = self.workers.get(worker.worker_id)
            if view is not None and opened.sessions > view.sessions:
                self.workers[worker.worker_id] = dataclasses.replace(view, sessions=opened.sessions)
            outside = bool(request.spec.region) and worker.region != request.spec.region
            if outside:
                log.warning(
                    "session %s placed in region %s: no worker in its region %s fits",
                    request.session_id,
                    worker.region,
                    request.spec.region,
                )
            await self.bus.publish(
                names.SUBJECT_SESSION_PLACED,
                session_id=request.session_id,
                worker_id=worker.worker_id,
                epoch=epoch,
                model_id=request.spec.model_id,
                detail=(
                    f"region {worker.region}, outside its region {request.spec.region} "
                    "(none there fits)"
                    if outside
                    else f"region {worker.region}"
                ),
            )
            log.info(
                "placed session %s on %s (epoch %d)", request.session_id, worker.worker_id, epoch
            )
            return _as_placement(request.session_id, record, opened.model)
        assert last_error is not None
        await self._unplace(key, version, previous, epoch)
        raise last_error

    def _release_slot(self, worker: WorkerView) -> None:
        """Undo a slot taken in the table for a placement that did not happen (unless the
        worker's own update replaced the entry meanwhile)."""
        view = self.workers.get(worker.worker_id)
        if view is not None and view.sessions == worker.sessions + 1:
            self.workers[worker.worker_id] = worker

    async def _unplace(
        self,
        key: str,
        version: int,
        previous: internal_pb2.PlacementRecord | None,
        epoch: int,
    ) -> None:
        """No worker took the session: a new one has no placement, a parked one stays
        parked (at ``epoch``, which fences the workers tried); a recovered one keeps its
        record, pointing at a worker without it (its next Recover re-places it)."""
        if version == 0 or (previous is not None and not previous.parked):
            return
        kvs = etcd.kv(self.etcd)
        if previous is None:
            undo = kvs.txn_op_delete(key)
        else:
            parked = internal_pb2.PlacementRecord()
            parked.CopyFrom(previous)
            parked.epoch = epoch
            undo = kvs.txn_op_put(key, parked.SerializeToString())
        await kvs.txn(
            compare=[kvs.txn_compare_version(key, version), *self.fence()],
            success=[undo],
        )

    async def aclose(self) -> None:
        for recovery in list(self._recoveries):
            recovery.cancel()
        await asyncio.gather(*self._recoveries, return_exceptions=True)
        task, self.watch_task = self.watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _as_placement(
    session_id: str, record: internal_pb2.PlacementRecord, model: pb.ModelInfo | None = None
) -> internal_pb2.Placement:
    return internal_pb2.Placement(
        session_id=session_id,
        worker_id=record.worker_id,
        worker_address=record.worker_address,
        epoch=record.epoch,
        model=model,
        region=record.region,
        cutover_frame=record.cutover_frame,
    )
