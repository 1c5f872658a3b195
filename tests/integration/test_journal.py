"""The worker's journal against real NATS and etcd: appends under client errors, the
CLAIM that takes a log over, the head a log records, and restore's fallback."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import nats
import numpy as np
import pytest
from etcd3aio import Etcd3Client
from nats.js.api import Header

from services.worker.actor import SessionActor
from services.worker.journal import Journal, logged_key, replay_steps
from services.worker.models.base import Control
from tests.fakes import FakeRich, FakeWorld
from windflow.common import faults, names
from windflow.common.durable import (
    CheckpointCatalog,
    CheckpointStore,
    ControlLog,
    DeliveredHeads,
    Fenced,
    InputStore,
    StoredEntry,
    controls_by_frame,
    log_head,
    log_subject,
)
from windflow.errors import NotFound, ResourceExhausted
from windflow.infra import EtcdServer, NatsServer
from windflow.sdk.client import input_frame, make_control
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

T = TypeVar("T")
KIND = internal_pb2.LogEntry


def control(frame: int, action: int) -> internal_pb2.LogEntry:
    return internal_pb2.LogEntry(frame_index=frame, action=action, steps=1)


@pytest.fixture
async def journal(nats_server: NatsServer, etcd_server: EtcdServer) -> AsyncIterator[Journal]:
    nc = await nats.connect(nats_server.url)
    async with Etcd3Client([etcd_server.endpoint]) as client:
        log = ControlLog(nc.jetstream())
        await log.ensure()
        yield Journal(
            "worker-a",
            log,
            CheckpointStore(nc.jetstream()),
            CheckpointCatalog(client),
            checkpoint_every=4,
        )
    await nc.close()


def actor_at(frame: int, epoch: int = 1, session_id: str = "") -> SessionActor:
    model = FakeWorld()
    state = model.new_state(3)
    state.frame_index = frame
    return SessionActor(
        session_id or uuid.uuid4().hex,
        pb.SessionSpec(model_id="fake-world", seed=3, fps=24.0, steps=1),
        model,
        state,
        epoch=epoch,
        window=8,
        out_queue=4,
        max_pending_controls=16,
        now=0.0,
    )


async def inline(fn: Callable[[], T]) -> T:
    return fn()


async def test_an_append_retries_through_client_errors_and_lands_once(journal: Journal) -> None:
    actor = actor_at(0)
    previous = faults.install(
        faults.Faults(
            faults.parse("log.append=ConnectionClosedError@1;log.append=NatsTimeoutError@2")
        )
    )
    try:
        await journal.append(actor, control(0, 1))
    finally:
        faults.install(previous)
    stored = await journal.log.read(actor.session_id)
    assert [(s.entry.frame_index, s.entry.action) for s in stored] == [(0, 1)]
    assert actor.log_seq == stored[0].seq


async def test_a_retry_of_a_try_that_landed_gets_its_sequence_not_a_fence(
    journal: Journal, nats_server: NatsServer
) -> None:
    """The first try reached the server and only its ack was lost: without the message id
    the retry (still expecting the sequence before) would read as a new owner's fence."""
    sid = uuid.uuid4().hex
    first = await journal.log.append(sid, control(0, 1), 0)
    nc = await nats.connect(nats_server.url)
    try:
        landed = await nc.jetstream().publish(
            log_subject(sid),
            control(5, 2).SerializeToString(),
            headers={
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(first),
                Header.MSG_ID.value: "try-1",
            },
        )
    finally:
        await nc.close()
    assert await journal.log.append(sid, control(5, 2), first, "try-1") == landed.seq
    assert await journal.log.length(sid) == 2
    with pytest.raises(Fenced):  # a different entry at the same place is a fence
        await journal.log.append(sid, control(5, 3), first, "try-2")


async def test_claim_fences_the_previous_owner_and_drops_the_undelivered_future(
    journal: Journal,
) -> None:
    old = actor_at(0)
    for entry in (control(0, 1), control(50, 2), control(90, 0)):
        await journal.append(old, entry)
    head = internal_pb2.LogEntry(kind=KIND.KIND_HEAD, frame_index=100)
    await journal.append(old, head)
    entries = await journal.log.read(old.session_id)
    assert log_head(entries) == 100

    new = actor_at(60, epoch=2, session_id=old.session_id)  # the client saw frames < 60
    await journal.claim(new, entries)
    after = await journal.log.read(old.session_id)
    assert [(s.entry.kind, s.entry.frame_index) for s in after] == [
        (KIND.KIND_CONTROL, 0),
        (KIND.KIND_CONTROL, 50),
        (KIND.KIND_CLAIM, 60),
    ]
    assert log_head(after) == 60
    with pytest.raises(Fenced):
        await journal.append(old, control(101, 1))
    await journal.sync_logged(new, after)
    # frame 59's control: what frame 60 continues from
    assert new.logged == logged_key(Control(2), 1)
    await journal.append(new, control(60, 1))  # the new owner appends after its CLAIM


async def test_a_claim_loses_to_a_last_append_read_after(journal: Journal) -> None:
    old = actor_at(0)
    await journal.append(old, control(0, 1))
    entries = await journal.log.read(old.session_id)
    await journal.append(old, control(7, 2))  # between the new owner's read and its CLAIM
    with pytest.raises(Fenced):
        await journal.claim(actor_at(7, epoch=2, session_id=old.session_id), entries)


def test_log_head_is_the_newest_of_head_marks_entries_claims_and_checkpoints() -> None:
    def stored(*entries: internal_pb2.LogEntry) -> list[StoredEntry]:
        return [StoredEntry(i + 1, e) for i, e in enumerate(entries)]

    assert log_head([]) == 0
    assert log_head(stored(control(0, 1), control(9, 2))) == 10
    assert log_head(stored(control(0, 1)), [48]) == 48
    head = internal_pb2.LogEntry(kind=KIND.KIND_HEAD, frame_index=120)
    claim = internal_pb2.LogEntry(kind=KIND.KIND_CLAIM, frame_index=130)
    assert log_head(stored(control(0, 1), head), [96]) == 120
    assert log_head(stored(control(0, 1), head, claim), [96]) == 130


async def test_restore_falls_back_past_an_unreadable_checkpoint_and_replays_the_log(
    journal: Journal, etcd_server: EtcdServer
) -> None:
    model = FakeWorld()
    actor = actor_at(0)
    sid = actor.session_id
    async with Etcd3Client([etcd_server.endpoint]) as client:
        assert client.kv is not None
        placement = internal_pb2.PlacementRecord(worker_id="worker-a", epoch=1)
        await client.kv.put(names.placement_key(sid), placement.SerializeToString())
    # the session as it ran: frames 0..11 under two controls, state kept at 4 and 8
    state = model.new_state(3)
    expected = {}
    for frame in range(12):
        if frame in (4, 8):
            blob = model.snapshot(state)
            if frame == 8:
                blob = b"not a snapshot"  # corrupted in the store
            name = journal.store.object_name(sid, frame)
            await journal.store.put(name, blob)
            checkpoint = pb.Checkpoint(
                frame_index=frame, object_name=name, size=len(blob), model_version="test"
            )
            assert await journal.catalog.add(sid, checkpoint, epoch=1)
        action = 1 if frame < 6 else 2
        if frame in (0, 6):
            await journal.append(actor, control(frame, action))
        expected[frame] = model.step([state], [Control(action)], 1)[0].copy()

    restored = await journal.restore(sid, model, 3, 1, inline, to_frame=10)
    assert restored.state.frame_index == 10 and restored.checkpoint_frame == 4
    latest = await journal.restore(sid, model, 3, 1, inline, to_frame=None)
    # the log's head: its newest checkpoint (8, unreadable: 4, then the log replayed)
    assert latest.state.frame_index == 8 and latest.checkpoint_frame == 4
    step = functools.partial(model.step, [restored.state], [Control(2)], 1)
    assert (await asyncio.to_thread(step))[0].tobytes() == expected[10].tobytes()


async def test_a_full_log_refuses_appends_as_resource_exhausted(tmp_path: Path) -> None:
    """The stream's bounds refuse new entries (never drop old ones); the refusal is not a
    retryable outage, so the worker tells the client instead of holding its frame."""
    server = NatsServer(tmp_path)
    await server.start()
    nc = await nats.connect(server.url)
    try:
        log = ControlLog(nc.jetstream())
        await log.ensure(max_entries_per_session=2)
        sid = uuid.uuid4().hex
        last = await log.append(sid, control(0, 1), 0)
        last = await log.append(sid, control(1, 2), last)
        with pytest.raises(ResourceExhausted, match="is full"):
            await log.append(sid, control(2, 0), last)
        assert await log.append(uuid.uuid4().hex, control(0, 1), 0) > 0  # per session
    finally:
        await nc.close()
        await server.aclose()


async def test_objects_of_an_abandoned_future_go_unless_a_fork_shares_them(
    journal: Journal,
) -> None:
    parent, fork = uuid.uuid4().hex, uuid.uuid4().hex
    for frame in (4, 8):
        name = journal.store.object_name(parent, frame)
        await journal.store.put(name, b"state")
        await journal.catalog.put(
            parent, pb.Checkpoint(frame_index=frame, object_name=name, size=5)
        )
    shared = journal.store.object_name(parent, 4)
    await journal.catalog.put(fork, pb.Checkpoint(frame_index=4, object_name=shared, size=5))

    assert await journal.drop_checkpoints_after(parent, 2) == 1  # (a rewind to frame 2)
    assert await journal.catalog.list(parent) == []
    assert await journal.store.get(shared) == b"state"  # the fork still restores from it
    with pytest.raises(NotFound):
        await journal.store.get(journal.store.object_name(parent, 8))


async def test_a_recovery_with_no_client_restores_where_the_gateway_saw_it_left(
    journal: Journal, etcd_server: EtcdServer
) -> None:
    """The log says head 7 (its newest entry is at frame 6); the gateway recorded that the
    client left at 11 (the worker died before its HEAD entry landed): the session comes
    back at 11. A CLAIM at 9 (a client resuming there) lowers the record to 9."""
    async with Etcd3Client([etcd_server.endpoint]) as client:
        journal.heads = DeliveredHeads(client)
        actor = actor_at(0)
        sid = actor.session_id
        for frame, action in ((0, 1), (6, 2)):
            await journal.append(actor, control(frame, action))
        model = FakeWorld()
        assert (
            await journal.restore(sid, model, 3, 1, inline, to_frame=None)
        ).state.frame_index == 7
        await journal.heads.record(sid, 11)
        restored = await journal.restore(sid, model, 3, 1, inline, to_frame=None)
        assert restored.state.frame_index == 11
        await journal.claim(actor_at(9, epoch=2, session_id=sid), restored.entries)
        assert await journal.heads.get(sid) == 9
        await journal.heads.cap(sid, 12)  # never raised
        assert await journal.heads.get(sid) == 9
        journal.heads = None


async def test_prompts_poses_and_input_frames_are_logged_and_replay_exactly(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    """Each kind of control goes into the log (input frames by digest, their pixels in the
    object store), and a restore by a worker that never saw them (no cache) replays the
    same frames."""
    rng = np.random.default_rng(5)
    pictures = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    script = {
        0: make_control(0, 1, prompt="fox"),
        2: make_control(2, 1, frame=input_frame(pictures[0], pb.FRAME_FORMAT_RGB)),
        3: make_control(3, 0, pose=(0.1, -0.2)),
        5: make_control(5, 1, frame=input_frame(pictures[1])),
        6: make_control(6, 1, prompt="owl", frame=input_frame(pictures[2])),
    }
    nc = await nats.connect(nats_server.url)
    try:
        async with Etcd3Client([etcd_server.endpoint]) as client:
            js = nc.jetstream()

            def make_journal() -> Journal:
                return Journal(
                    "worker-a",
                    ControlLog(js),
                    CheckpointStore(js),
                    CheckpointCatalog(client),
                    checkpoint_every=0,
                    inputs=InputStore(js),
                )

            live_journal = make_journal()
            await live_journal.log.ensure()
            model = FakeRich()
            sid = uuid.uuid4().hex
            actor = SessionActor(
                sid,
                pb.SessionSpec(model_id="fake-rich", seed=3, fps=24.0, steps=1),
                model,
                model.new_state(3),
                epoch=1,
                window=8,
                out_queue=4,
                max_pending_controls=16,
                now=0.0,
            )
            live = []
            for i in range(9):
                if i in script:
                    actor.add_control(script[i])
                taken = actor.take_control().control
                entry = live_journal.entry_for(actor, taken, 1)
                if entry is not None:
                    await live_journal.append(actor, entry)
                live.append(model.step([actor.state], [taken], 1)[0])
                actor.begin_step()
                actor.end_step()
            entries = await live_journal.log.read(sid)
            assert [e.entry.frame_index for e in entries] == sorted(script)
            assert entries[-1].entry.prompt == "owl" and entries[-1].entry.input_digest
            assert list(entries[2].entry.pose) == pytest.approx([0.1, -0.2])

            # another worker: nothing cached; its restore reads the frames from the store
            other = make_journal()
            replayed: list[np.ndarray] = []
            restored = await other.restore(sid, model, 3, 1, inline, to_frame=0)
            controls = controls_by_frame(restored.entries)
            inputs = await other.load_inputs(controls, 0)
            assert len(inputs) == 3
            replay_steps(
                model,
                restored.state,
                controls,
                9,
                1,
                lambda _, rgb: replayed.append(np.asarray(rgb)),
                inputs,
            )
            assert all(np.array_equal(a, b) for a, b in zip(live, replayed, strict=True))

            # a resumed actor continues with what is in effect: the newest prompt and frame
            again = await other.restore(sid, model, 3, 1, inline, to_frame=9)
            resumed = actor_at(9)
            resumed.model = model
            await other.sync_logged(resumed, again.entries)
            assert resumed.current.prompt == "owl" and resumed.current.pose == pytest.approx(
                (0.1, -0.2)
            )
            assert resumed.current.frame is not None
            assert np.array_equal(resumed.current.frame.rgb, actor.current.frame.rgb)  # type: ignore[union-attr]
    finally:
        await nc.close()
