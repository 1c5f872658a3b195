"""The gateway's core: the public API over the router, the session service and workers.

It runs no model and holds no session state: records live in the session service,
placements in etcd; a client's stream is proxied to the worker that holds the session.
Lifecycle: construct -> use -> ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from etcd3aio import Etcd3Client
from opentelemetry import trace

from services.gateway.access import Access
from services.gateway.config import GatewayConfig
from services.gateway.proxy import StreamProxy
from windflow.access.tokens import Claims
from windflow.common import etcd, grpc_util, metrics, names, telemetry
from windflow.common.durable import DeliveredHeads, reach
from windflow.common.specs import resolve_spec
from windflow.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
    WindflowError,
)
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

MOVE_POLL_S = 0.1
STATUS_TIMEOUT_S = 2.0
"""How long GetSession waits for the worker holding a session to say its head (a healthy
one answers in milliseconds; a stalled one never): then the head delivered to its
clients is reported."""
"""How often GetSession asks again while the session's placed worker does not hold it yet
(a move in progress)."""
MOVE_WAIT_S = 5.0
"""How long GetSession waits for a move to land: a restore replays up to a checkpoint
interval, and a dead worker's detached sessions move when its lease (3 s) ends."""


class GatewayService:
    def __init__(self, config: GatewayConfig, client: Etcd3Client, access: Access) -> None:
        self.config = config
        self._etcd = client
        self.access = access
        self._router_channel = grpc_util.channel(config.router)
        self._store_channel = grpc_util.channel(config.session_service)
        self._router = internal_pb2_grpc.RouterStub(self._router_channel)
        self._store = internal_pb2_grpc.SessionStoreStub(self._store_channel)
        self._worker_channels = grpc_util.Channels()
        self._heads = DeliveredHeads(client)
        self._background: set[asyncio.Task[None]] = set()
        """Writes it owns that no caller waits for (where a stream's client left it)."""
        self._metrics = metrics.get()
        self._metrics.streams_active.add(0)  # (every series shows from the start)
        self._metrics.sessions_created.add(0)
        for kind in ("recovered", "migrated"):
            self._metrics.stream_recoveries.add(0, {"kind": kind})

    def _worker(self, address: str) -> internal_pb2_grpc.WorkerStub:
        return internal_pb2_grpc.WorkerStub(self._worker_channels.get(address))

    async def list_models(self, claims: Claims | None = None) -> list[pb.ModelInfo]:
        """The models some live worker serves (those the caller's token grants)."""
        seen: dict[str, pb.ModelInfo] = {}
        for worker in await etcd.list_workers(self._etcd):
            for model in worker.models:
                if claims is None or claims.allows_model(model.model_id):
                    seen.setdefault(model.model_id, model)
        return [seen[k] for k in sorted(seen)]

    async def create_session(self, spec: pb.SessionSpec, claims: Claims | None) -> pb.Session:
        with tracer.start_as_current_span(names.SPAN_CREATE_SESSION) as span:
            self.access.scope_spec(claims, spec)
            models = {m.model_id: m for m in await self.list_models()}
            model = models.get(spec.model_id)
            if model is None:
                known = ", ".join(sorted(models)) or "none"
                raise NotFound(f"unknown model {spec.model_id!r}; served now: {known}")
            resolved = resolve_spec(spec, model)
            await self.access.admit(claims)
            session = pb.Session(
                session_id=uuid.uuid4().hex,
                spec=resolved,
                state=pb.SESSION_STATE_UNSPECIFIED,
                created_unix_ms=int(time.time() * 1000),
                model=model,
                tenant=self.access.tenant(claims),
            )
            span.set_attribute("windflow.session_id", session.session_id)
            timeout = self.config.rpc_timeout_s
            meta = telemetry.inject_metadata()
            await grpc_util.call(
                self._store.CreateRecord(
                    internal_pb2.SessionRecord(session=session), timeout=timeout, metadata=meta
                )
            )
            try:
                placement = await grpc_util.call(
                    self._router.Place(
                        internal_pb2.PlaceRequest(session_id=session.session_id, spec=resolved),
                        timeout=timeout,
                        metadata=meta,
                    )
                )
            except WindflowError:
                session.state = pb.SESSION_STATE_FAILED
                with contextlib.suppress(WindflowError):
                    await self._update(session)
                raise
            session.state = pb.SESSION_STATE_PLACED
            session.worker_id = placement.worker_id
            session.placement_epoch = placement.epoch
            session.region = placement.region
            await self._update(session)
            await self.access.register(session)
            self._metrics.sessions_created.add(1)
            return session

    async def _update(self, session: pb.Session) -> None:
        await grpc_util.call(
            self._store.UpdateRecord(
                internal_pb2.SessionRecord(session=session), timeout=self.config.rpc_timeout_s
            )
        )

    async def _record(self, session_id: str, claims: Claims | None) -> pb.Session:
        """The session's record, if the caller's tenant owns it (else NOT_FOUND, as for a
        session that does not exist)."""
        if not session_id:
            raise InvalidArgument("session_id is empty")
        record = await grpc_util.call(
            self._store.GetRecord(
                internal_pb2.GetRecordRequest(session_id=session_id),
                timeout=self.config.rpc_timeout_s,
            )
        )
        self.access.check_owner(claims, record.session)
        return record.session

    async def _placement(self, session_id: str) -> internal_pb2.PlacementRecord:
        response = await etcd.kv(self._etcd).get(names.placement_key(session_id))
        if not response.kvs:
            raise NotFound(f"session {session_id!r} is not placed on any worker")
        return internal_pb2.PlacementRecord.FromString(response.kvs[0].value)

    async def get_session(self, session_id: str, claims: Claims | None) -> pb.Session:
        session = await self._record(session_id, claims)
        if session.state not in (pb.SESSION_STATE_PLACED, pb.SESSION_STATE_STREAMING):
            return session
        # The head comes from the worker holding the session. While it moves (the
        # placement moves first, then the new worker restores it) that worker may not
        # hold it yet: ask again, briefly, rather than report a head it does not know.
        deadline = time.monotonic() + MOVE_WAIT_S
        while True:
            try:
                placement = await self._placement(session_id)
                if placement.parked:
                    session.state = pb.SESSION_STATE_PARKED
                    session.head_frame = placement.parked_head
                    session.parked_unix_ms = placement.parked_unix_ms
                    session.worker_id = ""
                    await self._reach(session)
                    return session
                session.worker_id = placement.worker_id
                session.placement_epoch = placement.epoch
                session.region = placement.region
                status = await grpc_util.call(
                    self._worker(placement.worker_address).GetSessionStatus(
                        internal_pb2.GetSessionStatusRequest(session_id=session_id),
                        timeout=min(STATUS_TIMEOUT_S, self.config.rpc_timeout_s),
                    )
                )
            except (NotFound, Unavailable) as err:
                stalled = isinstance(err.__cause__, grpc.aio.AioRpcError) and (
                    err.__cause__.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                )
                if not stalled and time.monotonic() < deadline:
                    await asyncio.sleep(MOVE_POLL_S)
                    continue
                return await self._known_head(session)  # nothing that holds it answers
            except WindflowError:  # (its worker failing)
                return await self._known_head(session)
            session.head_frame = status.head_frame
            session.state = (
                pb.SESSION_STATE_STREAMING if status.attached else pb.SESSION_STATE_PLACED
            )
            await self._reach(session)
            return session

    async def _known_head(self, session: pb.Session) -> pb.Session:
        """``session`` with the head its clients were delivered up to where its worker
        cannot say (the record's own head is only updated at a close or a rewind): never
        behind a frame a client got."""
        try:
            delivered = await self._heads.get(session.session_id)
        except Exception:  # (etcd unreachable: the record's head, as before)
            log.warning("session %s: its delivered head could not be read", session.session_id)
            return session
        session.head_frame = max(session.head_frame, delivered)
        return session

    async def _reach(self, session: pb.Session) -> None:
        """``session.reach`` from its checkpoints and the head just read, with the replay
        time at the step cost a worker serving its model measured (its headroom)."""
        frame_ms = 0.0
        for worker in await etcd.list_workers(self._etcd):
            for room in worker.headroom:
                if room.model_id == session.spec.model_id and room.steps == session.spec.steps:
                    frame_ms = max(frame_ms, room.frame_ms)
        del session.reach[:]
        session.reach.extend(
            reach([c.frame_index for c in session.checkpoints], int(session.head_frame), frame_ms)
        )

    async def close_session(self, session_id: str, claims: Claims | None) -> pb.Session:
        await self._record(session_id, claims)
        return await grpc_util.call(
            self._store.Close(
                pb.CloseSessionRequest(session_id=session_id), timeout=self.config.rpc_timeout_s
            )
        )

    async def stream(
        self, requests: AsyncIterator[pb.ClientMessage], claims: Claims | None
    ) -> AsyncIterator[pb.ServerMessage]:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream closed before its Attach message") from None
        if not first.HasField("attach"):
            raise InvalidArgument("the first message on a stream must be Attach")
        session_id = first.attach.session_id
        session = await self._record(session_id, claims)
        if session.state in (pb.SESSION_STATE_CLOSED, pb.SESSION_STATE_FAILED):
            raise FailedPrecondition(f"session {session_id!r} is closed")
        self.access.check_model(claims, session.spec.model_id)
        budget = await self.access.budget(claims, session.spec.fps)
        placement = await self._placement(session_id)
        if placement.parked:
            placement = await self._unpark(session_id, placement, first.attach)
        proxy = StreamProxy(
            first,
            placement,
            self._worker,
            self._router,
            recover_timeout_s=self.config.recover_timeout_s,
            moved=self.placement_moved,
            on_end=self._note_delivered,
            tenant=self.access.tenant(claims),
            token_id="" if claims is None else claims.jti,
            budget=budget,
            token_usage=self.access.ledger.token_seconds,
        )
        # An explicit span, not the "current" one: this generator resumes in other contexts.
        span = tracer.start_span(
            names.SPAN_GATEWAY_STREAM,
            attributes={"windflow.session_id": session_id, "windflow.worker": placement.worker_id},
        )
        proxy.trace_context = trace.set_span_in_context(span)
        streams = self._metrics.streams_active
        streams.add(1)
        try:
            async for message in proxy.run(requests):
                yield message
        finally:
            streams.add(-1)
            span.end()

    async def _unpark(
        self, session_id: str, parked: internal_pb2.PlacementRecord, attach: pb.Attach
    ) -> internal_pb2.PlacementRecord:
        """Restore a parked session on a worker with room (the router's Recover of a parked
        placement): at the client's resume point, else at the head it was parked at."""
        t0 = time.perf_counter()
        await grpc_util.call(
            self._router.Recover(
                internal_pb2.RecoverRequest(
                    session_id=session_id,
                    epoch=parked.epoch,
                    resume=attach.resume,
                    resume_from=attach.resume_from,
                ),
                timeout=self.config.recover_timeout_s,
                metadata=telemetry.inject_metadata(),
            )
        )
        placement = await self._placement(session_id)
        log.info(
            "session %s unparked on %s in %.0f ms",
            session_id,
            placement.worker_id,
            (time.perf_counter() - t0) * 1000,
        )
        return placement

    def _note_delivered(self, session_id: str, frame: int) -> None:
        """Record where a stream's client left the session (``DeliveredHeads``), off the
        stream's own task (which may be being cancelled: the client went away)."""
        task = asyncio.create_task(
            self._record_delivered(session_id, frame), name=f"delivered:{session_id}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_delivered(self, session_id: str, frame: int) -> None:
        try:
            await self._heads.record(session_id, frame)
        except Exception:  # (the worker's own HEAD entry still records it)
            log.warning("session %s: where its client left it was not recorded", session_id)

    async def placement_moved(
        self, session_id: str, epoch: int
    ) -> internal_pb2.PlacementRecord | None:
        """Return the session's placement once it names an epoch other than ``epoch`` (an
        etcd watch from the revision read, so no move between the read and the watch is
        missed). A placement deleted (a close) is no move: the worker ends the stream."""
        key = names.placement_key(session_id)
        current = await etcd.kv(self._etcd).get(key)
        if current.kvs:
            record = internal_pb2.PlacementRecord.FromString(current.kvs[0].value)
            if record.epoch != epoch:
                return record
        assert self._etcd.watch is not None
        async for response in self._etcd.watch.watch(
            key, start_revision=current.header.revision + 1
        ):
            for event in response.events:
                if event.type != event.PUT:
                    continue
                record = internal_pb2.PlacementRecord.FromString(event.kv.value)
                if record.epoch != epoch:
                    return record
        return None

    async def fork(self, request: pb.ForkRequest, claims: Claims | None) -> pb.Session:
        """A new session of the parent's tenant (it counts against its quotas)."""
        await self._record(request.session_id, claims)
        await self.access.admit(claims)
        child: pb.Session = await grpc_util.call(
            self._store.Fork(request, timeout=self.config.rpc_timeout_s)
        )
        await self.access.register(child)
        self._metrics.sessions_created.add(1)
        return child

    async def fork_many(
        self, request: pb.ForkManyRequest, claims: Claims | None
    ) -> pb.ForkManyResponse:
        """``count`` forks at once, each a session of the parent's tenant (all count
        against its quotas, checked before any is made)."""
        await self._record(request.session_id, claims)
        await self.access.admit(claims, count=max(1, request.count))
        reply: pb.ForkManyResponse = await grpc_util.call(
            self._store.ForkMany(request, timeout=self.config.rpc_timeout_s)
        )
        for child in reply.sessions:
            await self.access.register(child)
        return reply

    async def rewind(self, request: pb.RewindRequest, claims: Claims | None) -> pb.Session:
        await self._record(request.session_id, claims)
        return await grpc_util.call(self._store.Rewind(request, timeout=self.config.rpc_timeout_s))

    async def replay(
        self, request: pb.ReplayRequest, claims: Claims | None
    ) -> AsyncIterator[pb.Frame]:
        session = await self.get_session(request.session_id, claims)
        if not 0 <= request.from_frame <= request.to_frame <= session.head_frame:
            raise OutOfRange(
                f"replay range [{request.from_frame}, {request.to_frame}) is outside the "
                f"frames session {request.session_id} made (0..{session.head_frame})"
            )
        address = await self._replay_worker(session)
        call = self._worker(address).Replay(
            internal_pb2.WorkerReplayRequest(
                session_id=session.session_id,
                spec=session.spec,
                from_frame=request.from_frame,
                to_frame=request.to_frame,
            ),
            metadata=telemetry.inject_metadata(),
        )
        try:
            async for frame in call:
                yield frame
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc) from exc

    async def _replay_worker(self, session: pb.Session) -> str:
        """The worker holding the session, else any live worker serving its model."""
        with contextlib.suppress(NotFound):
            placement = await self._placement(session.session_id)
            if not placement.parked:
                return placement.worker_address
        for worker in await etcd.list_workers(self._etcd):
            if any(m.model_id == session.spec.model_id for m in worker.models):
                return worker.address
        raise Unavailable(f"no live worker serves model {session.spec.model_id!r}")

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self.config.rpc_timeout_s)
        for channel in (self._router_channel, self._store_channel):
            await channel.close()
        await self._worker_channels.aclose()
