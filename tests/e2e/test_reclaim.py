"""Reclaiming abandoned sessions end to end (docs/access.md): sessions never attached are
closed, detached ones parked (checkpointed, slot freed) and restored bit for bit on the
next attach, parked ones closed after their retention. Real etcd, NATS and services."""

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

CAPACITY = 3
UNATTACHED_S = 3.0
PARK_AFTER_S = 2.0
RETENTION_S = 6.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(
        tmp_path_factory.mktemp("reclaim"),
        workers=1,
        worker_args=("--capacity", str(CAPACITY), "--admission", "slots"),
        session_args=(
            "--close-unattached-s",
            str(UNATTACHED_S),
            "--park-after-s",
            str(PARK_AFTER_S),
            "--park-retention-s",
            str(RETENTION_S),
            "--retention-every-s",
            "0.25",
            "--reclaim-every-s",
            "0.25",
        ),
    ) as m:
        yield m


async def new_session(client: Client, seed: int) -> pb.Session:
    return await client.create_session(
        DEFAULT_MODEL, seed=seed, format="rgb", output_policy="pause", quality="fixed"
    )


async def wait_state(client: Client, session_id: str, state: int, within_s: float) -> float:
    """Seconds until GetSession says ``state`` (fails past ``within_s``)."""
    t0 = time.monotonic()
    while True:
        got = await client.get_session(session_id)
        if got.state == state:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within_s, (
            f"session {session_id} still {pb.SessionState.Name(got.state)} after {within_s} s"
        )
        await asyncio.sleep(0.2)


async def frames_of(
    client: Client,
    session: pb.Session,
    count: int,
    controls: list[tuple[int, int]],
    resume_from: int | None = None,
) -> list[pb.Frame]:
    live = await client.attach(session, controls=controls, resume_from=resume_from)
    try:
        return [f.frame async for f in live.frames(limit=count)]
    finally:
        await live.aclose()


async def test_abandoned_sessions_are_closed_and_capacity_comes_back(mesh: Mesh) -> None:
    """The issue's report: sessions created and never attached (a client that crashed)
    filled the stack, and every CreateSession after that was refused for good."""
    async with Client(mesh.gateway) as client:
        abandoned = [await new_session(client, seed=i) for i in range(CAPACITY)]
        with pytest.raises(errors.ResourceExhausted):
            await new_session(client, seed=99)
        t0 = time.monotonic()
        while True:
            try:
                fresh = await new_session(client, seed=100)
                break
            except errors.ResourceExhausted:
                assert time.monotonic() - t0 < UNATTACHED_S + 5, "capacity never came back"
                await asyncio.sleep(0.2)
        # each is closed by the limit (plus a round): they were made one after the other,
        # so the first may free its slot a round before the last is closed
        for session in abandoned:
            left = UNATTACHED_S + 5 - (time.monotonic() - t0)
            await wait_state(client, session.session_id, pb.SESSION_STATE_CLOSED, left)
        await client.close_session(fresh.session_id)
        assert f"closed session {abandoned[0].session_id}: no client attached" in mesh.log(
            "session"
        )


async def test_detached_session_parks_and_resumes_bit_exactly(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        reference = await new_session(client, seed=7)
        n = len(reference.model.actions)
        controls = [(f, (f // 5) % n) for f in range(0, 80, 5)]
        expected = await frames_of(client, reference, 80, controls)
        await client.close_session(reference.session_id)
        session = await new_session(client, seed=7)

        first = await frames_of(client, session, 40, controls)
        assert [f.data for f in first] == [f.data for f in expected[:40]]
        await wait_state(client, session.session_id, pb.SESSION_STATE_PARKED, PARK_AFTER_S + 5)
        parked = await client.get_session(session.session_id)
        assert parked.worker_id == "" and parked.parked_unix_ms > 0
        assert parked.head_frame >= 40
        # its slot is free: the worker holds no session
        worker = (await client.get_session(session.session_id)).worker_id
        assert worker == ""
        # the next attach restores it, at the frame after the last one its client saw
        later = [(f, a) for f, a in controls if f >= 40]
        t0 = time.perf_counter()
        resumed = await frames_of(client, session, 40, later, resume_from=40)
        unpark_ms = (time.perf_counter() - t0) * 1000
        assert [f.frame_index for f in resumed] == list(range(40, 80))
        assert [f.data for f in resumed] == [f.data for f in expected[40:]]
        assert unpark_ms < 20_000
        assert f"parked session {session.session_id} at frame" in mesh.log("session")
        await client.close_session(session.session_id)


async def test_attach_without_resume_continues_at_the_parked_head(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        session = await new_session(client, seed=11)
        first = await frames_of(client, session, 20, [])
        await wait_state(client, session.session_id, pb.SESSION_STATE_PARKED, PARK_AFTER_S + 5)
        head = (await client.get_session(session.session_id)).head_frame
        assert head >= 20
        again = await frames_of(client, session, 5, [])
        assert again[0].frame_index == head
        assert first[-1].frame_index < head
        await client.close_session(session.session_id)


async def test_parked_session_is_closed_after_its_retention(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        session = await new_session(client, seed=12)
        await frames_of(client, session, 5, [])
        await wait_state(client, session.session_id, pb.SESSION_STATE_PARKED, PARK_AFTER_S + 5)
        await wait_state(client, session.session_id, pb.SESSION_STATE_CLOSED, RETENTION_S + 5)
        with pytest.raises(errors.FailedPrecondition):
            await frames_of(client, session, 1, [])


async def test_fork_and_close_of_a_parked_session(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        session = await new_session(client, seed=13)
        made = await frames_of(client, session, 30, [])
        await wait_state(client, session.session_id, pb.SESSION_STATE_PARKED, PARK_AFTER_S + 5)
        child = await client.fork(session.session_id, 10)
        assert [f.data for f in await frames_of(client, child, 20, [])] == [
            f.data for f in made[10:30]
        ]
        closed = await client.close_session(session.session_id)
        assert closed.state == pb.SESSION_STATE_CLOSED
        await client.close_session(child.session_id)
