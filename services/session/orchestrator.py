"""Fork and rewind: the session service's orchestration over log, catalog, router, worker.

- Fork(s, k): a new session record (same spec, parent s, forked at k); its control log is
  s's log up to frame k and its catalog s's checkpoints up to k (objects are shared, never
  rewritten); the router places it with ``restore_to=k``, and the chosen worker rebuilds
  the state at k (checkpoint + log replay).
- Rewind(s, k): the worker holding s replaces its state with the one at k, truncates the
  log after k and forgets later checkpoints; the record's head follows.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from services.session.store import SessionStore
from windflow.common import etcd, grpc_util, names, telemetry
from windflow.common.durable import CheckpointCatalog, ControlLog
from windflow.common.events import EventBus
from windflow.errors import NotFound, OutOfRange, WindflowError
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)


class Orchestrator:
    def __init__(
        self,
        store: SessionStore,
        control_log: ControlLog,
        catalog: CheckpointCatalog,
        router_address: str,
        bus: EventBus,
        *,
        rpc_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.log = control_log
        self.catalog = catalog
        self._bus = bus
        self._timeout = rpc_timeout_s
        self._router_channel = grpc_util.channel(router_address)
        self._router = internal_pb2_grpc.RouterStub(self._router_channel)
        self._workers: dict[str, grpc.aio.Channel] = {}

    def _worker(self, address: str) -> internal_pb2_grpc.WorkerStub:
        channel = self._workers.get(address)
        if channel is None:
            channel = self._workers[address] = grpc_util.channel(address)
        return internal_pb2_grpc.WorkerStub(channel)

    async def _placement(self, session_id: str) -> internal_pb2.PlacementRecord | None:
        response = await etcd.kv(self.store.etcd).get(names.placement_key(session_id))
        if not response.kvs:
            return None
        return internal_pb2.PlacementRecord.FromString(response.kvs[0].value)

    async def head(self, session: pb.Session) -> int:
        """Frames the session has made: from its worker when live, else from its record."""
        placement = await self._placement(session.session_id)
        if placement is None:
            return int(session.head_frame)
        status = await grpc_util.call(
            self._worker(placement.worker_address).GetSessionStatus(
                internal_pb2.GetSessionStatusRequest(session_id=session.session_id),
                timeout=self._timeout,
            )
        )
        return int(status.head_frame)

    async def _check_range(self, session: pb.Session, frame: int, what: str) -> int:
        head = await self.head(session)
        if frame < 0 or frame > head:
            raise OutOfRange(
                f"cannot {what} session {session.session_id} at frame {frame}: "
                f"frames 0..{head} exist"
            )
        return head

    async def describe(self, session: pb.Session) -> pb.Session:
        """The record plus its checkpoints and log length."""
        session.checkpoints.extend(await self.catalog.list(session.session_id))
        session.log_length = await self.log.length(session.session_id)
        return session

    async def fork(self, request: pb.ForkRequest) -> pb.Session:
        parent = await self.store.get(request.session_id)
        await self._check_range(parent, request.at_frame, "fork")
        at = request.at_frame
        child = pb.Session(
            session_id=uuid.uuid4().hex,
            spec=parent.spec,
            model=parent.model,
            state=pb.SESSION_STATE_UNSPECIFIED,
            created_unix_ms=int(time.time() * 1000),
            parent_session_id=parent.session_id,
            forked_at=at,
            head_frame=at,
        )
        await self.store.create(child)
        await self.log.copy(parent.session_id, child.session_id, before_frame=at)
        for checkpoint in await self.catalog.list(parent.session_id):
            if checkpoint.frame_index <= at:
                await self.catalog.put(child.session_id, checkpoint)
        try:
            placement = await grpc_util.call(
                self._router.Place(
                    internal_pb2.PlaceRequest(
                        session_id=child.session_id,
                        spec=child.spec,
                        restore=True,
                        restore_to=at,
                    ),
                    timeout=self._timeout,
                    metadata=telemetry.inject_metadata(),
                )
            )
        except WindflowError:
            child.state = pb.SESSION_STATE_FAILED
            await self.store.update(child)
            raise
        child.state = pb.SESSION_STATE_PLACED
        child.worker_id = placement.worker_id
        child.placement_epoch = placement.epoch
        await self.store.update(child)
        await self._bus.publish(
            names.SUBJECT_SESSION_FORKED,
            session_id=child.session_id,
            worker_id=placement.worker_id,
            detail=f"from {parent.session_id} at {at}",
        )
        return await self.describe(child)

    async def rewind(self, request: pb.RewindRequest) -> pb.Session:
        session = await self.store.get(request.session_id)
        await self._check_range(session, request.to_frame, "rewind")
        placement = await self._placement(session.session_id)
        if placement is None:
            raise NotFound(f"session {session.session_id} is not live on any worker")
        status = await grpc_util.call(
            self._worker(placement.worker_address).Rewind(
                pb.RewindRequest(session_id=session.session_id, to_frame=request.to_frame),
                timeout=self._timeout,
            )
        )
        session.head_frame = status.head_frame
        await self.store.update(session)
        await self._bus.publish(
            names.SUBJECT_SESSION_REWOUND,
            session_id=session.session_id,
            worker_id=placement.worker_id,
            detail=f"to {request.to_frame}",
        )
        return await self.describe(session)

    async def aclose(self) -> None:
        await self._router_channel.close()
        for channel in self._workers.values():
            await channel.close()
