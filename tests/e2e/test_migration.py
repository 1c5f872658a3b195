"""Live migration against the real stack (docs/migration.md): sessions move between
workers while they stream, and the client sees every frame once, identical to Replay,
with one KIND_MIGRATED event per move and no recovery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.common import grpc_util
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

WORKER_ARGS = ("--lease-ttl", "2", "--heartbeat", "0.5")
SPEC = {"format": "rgb", "output_policy": "pause", "fps": 24.0, "quality": "fixed"}


def _router(mesh: Mesh) -> tuple[grpc.aio.Channel, internal_pb2_grpc.RouterStub]:
    channel = grpc_util.channel(mesh.addresses["router"])
    return channel, internal_pb2_grpc.RouterStub(channel)


def _kinds(live: Session, kind: int) -> list[pb.SessionEvent]:
    return [e for e in live.events if e.kind == kind]


class Player:
    """Reads a session's frames in a task; ``at(n)`` returns once frame n arrived."""

    def __init__(self, live: Session, frames: int) -> None:
        self.got: list[tuple[int, bytes, float]] = []
        self._marks: dict[int, asyncio.Event] = {}
        self.task = asyncio.create_task(self._run(live, frames))

    async def _run(self, live: Session, frames: int) -> list[tuple[int, bytes, float]]:
        async for f in live.frames(limit=frames):
            self.got.append((f.index, f.frame.data, time.monotonic()))
            for mark in [m for m in self._marks if m <= f.index]:
                self._marks.pop(mark).set()
        return self.got

    async def at(self, frame: int) -> None:
        if self.got and self.got[-1][0] >= frame:
            return
        await self._marks.setdefault(frame, asyncio.Event()).wait()


async def _replayed(client: Client, session_id: str, stop: int) -> list[bytes]:
    return [f.frame.data async for f in client.replay(session_id, 0, stop)]


async def test_a_streaming_session_migrates_there_and_back_without_a_lost_frame(
    tmp_path: Path,
) -> None:
    """Two moves of a session under changing controls: every frame arrives once, in
    order, bit-identical to Replay; the client sees KIND_MIGRATED twice (with the workers
    and the cut-over frame) and never KIND_RECOVERED; the session ends where it was sent."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS) as mesh:
        channel, router = _router(mesh)
        async with Client(mesh.gateway) as client, channel:
            info = await client.create_session(DEFAULT_MODEL, seed=3, **SPEC)  # type: ignore[arg-type]
            n = len(info.model.actions)
            controls = [(f, (f // 5) % n) for f in range(0, 160, 5)]
            live = await client.attach(info, controls=controls)
            play = Player(live, 150)
            other = "worker-2" if info.worker_id == "worker-1" else "worker-1"
            await play.at(30)
            there = await router.Migrate(
                internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id=other)
            )
            await play.at(90)
            back = await router.Migrate(
                internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id=info.worker_id)
            )
            got = await play.task
            await live.aclose()

            assert [i for i, _, _ in got] == list(range(150))
            assert (there.from_worker_id, there.to_worker_id) == (info.worker_id, other)
            assert (back.from_worker_id, back.to_worker_id) == (other, info.worker_id)
            assert 30 <= there.cutover_frame < back.cutover_frame < 150
            migrated = _kinds(live, pb.SessionEvent.KIND_MIGRATED)
            assert [(e.from_worker_id, e.worker_id, e.frame_index) for e in migrated] == [
                (info.worker_id, other, there.cutover_frame),
                (other, info.worker_id, back.cutover_frame),
            ]
            assert not _kinds(live, pb.SessionEvent.KIND_RECOVERED)
            assert not live.errors
            assert await _replayed(client, info.session_id, 150) == [d for _, d, _ in got]
            placed = await client.get_session(info.session_id)
            assert (placed.worker_id, placed.placement_epoch) == (info.worker_id, 3)
            assert placed.region == "local"


async def test_migrate_refuses_bad_requests_with_the_right_status(tmp_path: Path) -> None:
    """Unknown session: NOT_FOUND; unknown worker or region: INVALID_ARGUMENT; to the
    worker it is on, or while it migrates already: FAILED_PRECONDITION. A refused move
    leaves the session streaming where it was."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS) as mesh:
        channel, router = _router(mesh)
        async with Client(mesh.gateway) as client, channel:
            info = await client.create_session(DEFAULT_MODEL, seed=4, **SPEC)  # type: ignore[arg-type]
            live = await client.attach(info)
            play = Player(live, 60)
            await play.at(5)
            cases = [
                (internal_pb2.MigrateRequest(session_id="nope"), grpc.StatusCode.NOT_FOUND),
                (
                    internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id="w-9"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    internal_pb2.MigrateRequest(session_id=info.session_id, region="mars"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    internal_pb2.MigrateRequest(
                        session_id=info.session_id, to_worker_id=info.worker_id
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                ),
            ]
            for request, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await router.Migrate(request)
                assert refused.value.code() == code, request
            # two at once: one moves it, the other is refused
            outcomes = await asyncio.gather(
                router.Migrate(internal_pb2.MigrateRequest(session_id=info.session_id)),
                router.Migrate(internal_pb2.MigrateRequest(session_id=info.session_id)),
                return_exceptions=True,
            )
            errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.FAILED_PRECONDITION
            got = await play.task
            await live.aclose()
            assert [i for i, _, _ in got] == list(range(60))
            assert len(_kinds(live, pb.SessionEvent.KIND_MIGRATED)) == 1
            assert await _replayed(client, info.session_id, 60) == [d for _, d, _ in got]
