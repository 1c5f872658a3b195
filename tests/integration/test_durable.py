"""Control log (JetStream), checkpoint objects and the catalog, against real servers."""

from __future__ import annotations

import uuid

import nats
import pytest
from etcd3aio import Etcd3Client

from windflow.common import names
from windflow.common.durable import (
    CheckpointCatalog,
    CheckpointStore,
    ControlLog,
    Fenced,
    controls_by_frame,
)
from windflow.errors import NotFound
from windflow.infra import EtcdServer, NatsServer
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb


def control(frame: int, action: int) -> internal_pb2.LogEntry:
    return internal_pb2.LogEntry(frame_index=frame, action=action, steps=2)


async def test_log_append_read_truncate_copy_and_fencing(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        log = ControlLog(nc.jetstream())
        await log.ensure()
        await log.ensure()  # idempotent
        sid = uuid.uuid4().hex
        assert await log.read(sid) == []
        last = 0
        for frame, action in [(0, 1), (5, 2), (9, 3)]:
            last = await log.append(sid, control(frame, action), last)
        stored = await log.read(sid)
        assert [(s.entry.frame_index, s.entry.action) for s in stored] == [(0, 1), (5, 2), (9, 3)]
        assert await log.length(sid) == 3

        # a new owner claims the log: the old one's next append is refused
        claim = internal_pb2.LogEntry(kind=internal_pb2.LogEntry.KIND_CLAIM, epoch=2)
        await log.append(sid, claim, last)
        with pytest.raises(Fenced):
            await log.append(sid, control(12, 4), last)

        stored = await log.read(sid)
        await log.truncate(sid, stored, 5)
        assert [e.frame_index for e in controls_by_frame(await log.read(sid))] == [0]

        child = uuid.uuid4().hex
        assert await log.copy(sid, child, before_frame=3) == 1
        assert [(e.frame_index, e.action) for e in controls_by_frame(await log.read(child))] == [
            (0, 1)
        ]
    finally:
        await nc.close()


async def test_checkpoint_objects_round_trip(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        store = CheckpointStore(nc.jetstream())
        blob = bytes(range(256)) * 9000  # > 1 MB: chunked by the object store
        name = store.object_name("s1", 48)
        await store.put(name, blob)
        assert await store.get(name) == blob
        with pytest.raises(NotFound):
            await store.get("no-such-object")
    finally:
        await nc.close()


async def test_catalog_is_fenced_by_placement_epoch(etcd_server: EtcdServer) -> None:
    async with Etcd3Client([etcd_server.endpoint]) as client:
        assert client.kv is not None
        catalog = CheckpointCatalog(client)
        sid = uuid.uuid4().hex
        placement = internal_pb2.PlacementRecord(worker_id="w1", epoch=2)
        await client.kv.put(names.placement_key(sid), placement.SerializeToString())
        assert await catalog.add(sid, pb.Checkpoint(frame_index=48, object_name="a"), epoch=2)
        assert not await catalog.add(sid, pb.Checkpoint(frame_index=96, object_name="b"), epoch=1)
        await catalog.put(sid, pb.Checkpoint(frame_index=0, object_name="z"))
        await catalog.put(sid, pb.Checkpoint(frame_index=144, object_name="c"))
        assert [c.frame_index for c in await catalog.list(sid)] == [0, 48, 144]
        await catalog.drop_after(sid, 48)
        assert [c.object_name for c in await catalog.list(sid)] == ["z", "a"]
        await catalog.drop_all(sid)
        assert await catalog.list(sid) == []
