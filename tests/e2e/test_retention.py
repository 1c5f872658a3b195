"""Storage retention end to end (docs/access.md): old checkpoints are thinned (forks and
replays there still reach every frame, bit for bit, replaying more), GetSession says how
far each range replays, and a closed session's state goes after its retention, while a
fork of it keeps working. Real etcd, NATS and services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

EVERY = 12
RECENT_S = 2.0
CLOSED_S = 2.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(
        tmp_path_factory.mktemp("retention"),
        workers=1,
        worker_args=("--checkpoint-every", str(EVERY)),
        session_args=(
            "--retention-every-s",
            "0.5",
            "--keep-recent-s",
            str(RECENT_S),
            "--closed-retention-s",
            str(CLOSED_S),
        ),
    ) as m:
        yield m


async def frames_of(client: Client, session: pb.Session, count: int) -> list[bytes]:
    live = await client.attach(session)
    try:
        return [f.frame.data async for f in live.frames(limit=count)]
    finally:
        await live.aclose()


async def test_old_checkpoints_thin_and_a_closed_session_goes(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        session = await client.create_session(
            DEFAULT_MODEL, seed=31, format="rgb", output_policy="pause", quality="fixed"
        )
        fps = session.spec.fps
        made = await frames_of(client, session, 240)
        recent = RECENT_S * fps
        deadline = time.monotonic() + 15
        while True:
            described = await client.get_session(session.session_id)
            frames = [c.frame_index for c in described.checkpoints]
            head = described.head_frame
            if all(head - f <= recent for f in frames[1:]):
                break
            assert time.monotonic() < deadline, f"never thinned: {frames}"
            await asyncio.sleep(0.3)
        assert frames[0] == EVERY  # the oldest stays (one per minute of frames back there)
        assert len(frames) < 240 // EVERY
        # every frame is still reached: the old ones replay further, and GetSession says so
        reach = [(r.from_frame, r.to_frame, r.max_replay_frames) for r in described.reach]
        assert reach[0] == (0, EVERY, EVERY - 1)
        assert reach[1][:2] == (EVERY, frames[1]) and reach[1][2] == frames[1] - EVERY - 1
        assert reach[-1][1] == head + 1
        assert described.reach[1].max_replay_ms > 0  # at the worker's measured step cost
        replayed = [r.frame.data async for r in client.replay(session.session_id, 100, 110)]
        assert replayed == made[100:110]
        child = await client.fork(session.session_id, 60)

        closed = await client.close_session(session.session_id)
        assert closed.closed_unix_ms > 0
        deadline = time.monotonic() + CLOSED_S + 10
        while True:
            try:
                await client.get_session(session.session_id)
            except errors.NotFound:
                break
            assert time.monotonic() < deadline, "the closed session's state is still there"
            await asyncio.sleep(0.3)
        assert f"deleted closed session {session.session_id}" in mesh.log("session")
        # the fork shares its parent's checkpoint objects and has its own log: it goes on
        assert await frames_of(client, child, 30) == made[60:90]
        # ...and a replay of it restores the parent's checkpoint it inherited (its object
        # outlived the parent's deletion)
        again = [r.frame.data async for r in client.replay(child.session_id, 61, 70)]
        assert again == made[61:70]
        assert "unusable" not in mesh.log("worker-1")  # (else it replayed from the seed)
        await client.close_session(child.session_id)
