"""The session service's actor: session records kept durably in etcd.

Records live at /windflow/v1/sessions/<id>/record as serialized ``Session`` protos, so
any replica of this service (and a restarted one) sees the same state. Lifecycle events
(created, closed) go out on NATS.
"""

from __future__ import annotations

import logging

from etcd3aio import Etcd3Client, prefix_range_end

from windflow.common import etcd, names
from windflow.common.events import EventBus
from windflow.errors import AlreadyExists, InvalidArgument, NotFound
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)


class SessionStore:
    def __init__(self, client: Etcd3Client, bus: EventBus) -> None:
        self.etcd = client
        self._bus = bus

    async def create(self, session: pb.Session) -> pb.Session:
        if not session.session_id:
            raise InvalidArgument("a session record needs a session_id")
        kvs = etcd.kv(self.etcd)
        key = names.session_record_key(session.session_id)
        created = await kvs.txn(
            compare=[kvs.txn_compare_create_revision(key, 0)],
            success=[kvs.txn_op_put(key, session.SerializeToString())],
        )
        if not created.succeeded:
            raise AlreadyExists(f"session {session.session_id!r} already exists")
        await self._bus.publish(
            names.SUBJECT_SESSION_CREATED,
            session_id=session.session_id,
            model_id=session.spec.model_id,
        )
        return session

    async def get(self, session_id: str) -> pb.Session:
        response = await etcd.kv(self.etcd).get(names.session_record_key(session_id))
        if not response.kvs:
            raise NotFound(f"unknown session {session_id!r}")
        return pb.Session.FromString(response.kvs[0].value)

    async def update(self, session: pb.Session) -> pb.Session:
        previous = await self.get(session.session_id)
        await etcd.kv(self.etcd).put(
            names.session_record_key(session.session_id), session.SerializeToString()
        )
        if session.state == pb.SESSION_STATE_CLOSED and previous.state != pb.SESSION_STATE_CLOSED:
            await self._bus.publish(
                names.SUBJECT_SESSION_CLOSED,
                session_id=session.session_id,
                worker_id=session.worker_id,
                epoch=session.placement_epoch,
                model_id=session.spec.model_id,
            )
        return session

    async def list(self) -> list[pb.Session]:
        prefix = names.SESSIONS_PREFIX.encode()
        response = await etcd.kv(self.etcd).get(prefix, prefix_range_end(prefix))
        return [
            pb.Session.FromString(item.value)
            for item in response.kvs
            if item.key.endswith(b"/record")
        ]
