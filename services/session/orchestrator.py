"""Fork and rewind: the session service's orchestration over log, catalog, router, worker.

- Fork(s, k): a new session record (same spec, parent s, forked at k); its control log is
  s's log up to frame k and its catalog s's checkpoints up to k (objects are shared, never
  rewritten); the router places it with ``restore_to=k``, and the chosen worker rebuilds
  the state at k (checkpoint + log replay).
- Rewind(s, k): the worker holding s replaces its state with the one at k, truncates the
  log after k and forgets later checkpoints; the record's head follows.
- Close(s): wherever s is (on a worker, parked, nowhere): its placement goes and its record
  says CLOSED. The reclaimer (``services/session/reclaim.py``) closes through it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from services.session.store import SessionStore
from windflow.common import etcd, grpc_util, names, telemetry
from windflow.common.durable import CheckpointCatalog, ControlLog, reach
from windflow.common.events import EventBus
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

MAX_FORK_MANY = 64
"""Forks one ForkMany call makes at most."""


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
        self._workers = grpc_util.Channels()

    def worker(self, address: str) -> internal_pb2_grpc.WorkerStub:
        return internal_pb2_grpc.WorkerStub(self._workers.get(address))

    async def _placement(self, session_id: str) -> internal_pb2.PlacementRecord | None:
        response = await etcd.kv(self.store.etcd).get(names.placement_key(session_id))
        if not response.kvs:
            return None
        return internal_pb2.PlacementRecord.FromString(response.kvs[0].value)

    async def head(self, session: pb.Session) -> int:
        """Frames the session has made: from its worker when live, from its placement when
        parked, else from its record."""
        placement = await self._placement(session.session_id)
        if placement is None:
            return int(session.head_frame)
        if placement.parked:
            return int(placement.parked_head)
        status = await grpc_util.call(
            self.worker(placement.worker_address).GetSessionStatus(
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
        """The record plus its checkpoints, log length and reach (from the record's head;
        the gateway's GetSession sets it again from the live head)."""
        session.checkpoints.extend(await self.catalog.list(session.session_id))
        session.log_length = await self.log.length(session.session_id)
        session.reach.extend(
            reach([c.frame_index for c in session.checkpoints], int(session.head_frame))
        )
        return session

    async def fork(self, request: pb.ForkRequest) -> pb.Session:
        (child,) = await self.fork_many(
            pb.ForkManyRequest(session_id=request.session_id, at_frame=request.at_frame, count=1)
        )
        return child

    async def fork_many(self, request: pb.ForkManyRequest) -> list[pb.Session]:
        """``count`` forks of one session at one frame: records, logs (the parent's read
        once) and catalogs written together, then placed together (beside the parent where
        there is room: its in-memory ring restores them). All or none: a fork that could
        not be placed fails the call, and the others are closed."""
        if not 1 <= request.count <= MAX_FORK_MANY:
            raise InvalidArgument(f"count {request.count} is outside 1..{MAX_FORK_MANY}")
        parent = await self.store.get(request.session_id)
        await self._check_range(parent, request.at_frame, "fork")
        at = request.at_frame
        now_ms = int(time.time() * 1000)
        children = [
            pb.Session(
                session_id=uuid.uuid4().hex,
                spec=parent.spec,
                model=parent.model,
                state=pb.SESSION_STATE_UNSPECIFIED,
                created_unix_ms=now_ms,
                parent_session_id=parent.session_id,
                forked_at=at,
                head_frame=at,
                tenant=parent.tenant,
            )
            for _ in range(request.count)
        ]
        await asyncio.gather(*(self.store.create(child) for child in children))
        inherited = [c for c in await self.catalog.list(parent.session_id) if c.frame_index <= at]
        copy = asyncio.create_task(
            self.log.copy_many(parent.session_id, [c.session_id for c in children], before_frame=at)
        )
        await asyncio.gather(
            *(self.catalog.put(child.session_id, c) for child in children for c in inherited)
        )
        copied = await copy
        placed = await asyncio.gather(
            *(self._place_fork(child, parent, at) for child in children), return_exceptions=True
        )
        failed = [p for p in placed if isinstance(p, BaseException)]
        if failed:
            for child, outcome in zip(children, placed, strict=True):
                if not isinstance(outcome, BaseException):
                    with contextlib.suppress(WindflowError):
                        await self.close(child.session_id)
            raise failed[0]
        for child in children:
            child.checkpoints.extend(inherited)
            child.log_length = copied
        return children

    async def _place_fork(self, child: pb.Session, parent: pb.Session, at: int) -> None:
        try:
            placement = await grpc_util.call(
                self._router.Place(
                    internal_pb2.PlaceRequest(
                        session_id=child.session_id,
                        spec=child.spec,
                        restore=True,
                        restore_to=at,
                        affinity_session_id=parent.session_id,
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

    async def rewind(self, request: pb.RewindRequest) -> pb.Session:
        session = await self.store.get(request.session_id)
        await self._check_range(session, request.to_frame, "rewind")
        placement = await self._placement(session.session_id)
        if placement is None:
            raise NotFound(f"session {session.session_id} is not live on any worker")
        if placement.parked:
            placement = await self.unpark(session.session_id, placement)
        status = await grpc_util.call(
            self.worker(placement.worker_address).Rewind(
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

    async def unpark(
        self, session_id: str, placement: internal_pb2.PlacementRecord
    ) -> internal_pb2.PlacementRecord:
        """Restore a parked session on a worker (the router's Recover of a parked
        placement), at its head; its new placement."""
        placed = await grpc_util.call(
            self._router.Recover(
                internal_pb2.RecoverRequest(session_id=session_id, epoch=placement.epoch),
                timeout=self._timeout,
                metadata=telemetry.inject_metadata(),
            )
        )
        return internal_pb2.PlacementRecord(
            worker_id=placed.worker_id,
            worker_address=placed.worker_address,
            epoch=placed.epoch,
            spec=placement.spec,
            region=placed.region,
        )

    async def close(self, session_id: str, *, if_idle_s: float = 0.0, epoch: int = 0) -> pb.Session:
        """Close ``session_id``: its worker lets it go, its placement goes, its record says
        CLOSED. With ``if_idle_s`` (the reclaimer), only a session no client ever attached
        to that has waited that long on its worker at ``epoch``, and only if its placement
        is still the one read (else FAILED_PRECONDITION: it is in use or moved)."""
        session = await self.store.get(session_id)
        if session.state == pb.SESSION_STATE_CLOSED:
            return session
        kvs = etcd.kv(self.store.etcd)
        key = names.placement_key(session_id)
        current = await kvs.get(key)
        if current.kvs:
            placement = internal_pb2.PlacementRecord.FromString(current.kvs[0].value)
            if placement.parked:
                session.head_frame = placement.parked_head
            else:
                try:
                    status = await grpc_util.call(
                        self.worker(placement.worker_address).CloseSession(
                            internal_pb2.CloseWorkerSessionRequest(
                                session_id=session_id, if_idle_s=if_idle_s, epoch=epoch
                            ),
                            timeout=self._timeout,
                        )
                    )
                    session.head_frame = status.head_frame
                except (NotFound, Unavailable):
                    # not on its worker, or its worker is gone: nothing holds it. (Any other
                    # failure is the caller's to retry: the placement stays, so that the
                    # worker's actor is not left behind holding a slot.)
                    pass
            if if_idle_s > 0:
                gone = await kvs.txn(
                    compare=[kvs.txn_compare_version(key, current.kvs[0].version)],
                    success=[kvs.txn_op_delete(key)],
                )
                if not gone.succeeded:
                    raise FailedPrecondition(f"session {session_id} moved while it was closed")
            else:
                await kvs.delete(key)
        session.state = pb.SESSION_STATE_CLOSED
        session.closed_unix_ms = int(time.time() * 1000)
        await self.store.update(session)
        if session.tenant:
            await kvs.delete(names.tenant_session_key(session.tenant, session_id))
        return session

    async def aclose(self) -> None:
        await self._router_channel.close()
        await self._workers.aclose()
