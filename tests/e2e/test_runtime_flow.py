"""Backpressure and admission with real services: a slow reader costs only itself, and a
worker that cannot meet a session's fps refuses it with a retry-after hint."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.sdk import Client, ReceivedFrame, Session
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = DEFAULT_MODEL
FPS = 16.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    # one worker; admission keeps its step thread under 30% busy (by its measured costs)
    async with Mesh(
        tmp_path_factory.mktemp("flow"),
        workers=1,
        worker_args=("--target-utilization", "0.3", "--capacity", "64"),
    ) as m:
        yield m


async def _read(session: Session, seconds: float, delay_s: float = 0.0) -> list[ReceivedFrame]:
    out: list[ReceivedFrame] = []
    stop = time.monotonic() + seconds
    async for frame in session.frames():
        out.append(frame)
        if time.monotonic() >= stop:
            return out
        if delay_s:
            await asyncio.sleep(delay_s)
    return out


def _fps(frames: list[ReceivedFrame]) -> float:
    span = (frames[-1].received_us - frames[0].received_us) / 1e6
    return (len(frames) - 1) / span


async def test_slow_reader_drops_its_own_frames_and_pauses_only_itself(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        spec: dict[str, Any] = {
            "fps": FPS,
            "steps": 1,
            "quality": "fixed",
            "width": 64,
            "height": 64,
        }
        async with (
            client.session(MODEL, seed=1, window=2, **spec) as fast,
            client.session(MODEL, seed=2, window=2, **spec) as slow,
            client.session(MODEL, seed=3, window=2, output_policy="pause", **spec) as paused,
        ):
            fast_frames, slow_frames, paused_frames = await asyncio.gather(
                _read(fast, 3.0),
                _read(slow, 3.0, delay_s=4 / FPS),  # reads at a quarter of its fps
                _read(paused, 3.0, delay_s=4 / FPS),
            )
            # the fast reader is not slowed down by the slow ones
            assert _fps(fast_frames[2:]) >= 0.9 * FPS
            assert all(b.index == a.index + 1 for a, b in itertools.pairwise(fast_frames))
            # DROP_OLDEST: generation went on, the slow reader saw gaps, counted as dropped
            indices = [f.index for f in slow_frames]
            assert len(slow_frames) <= 0.45 * len(fast_frames)
            assert indices[-1] - indices[0] > len(indices)  # gaps: frames were dropped
            assert slow_frames[-1].frame.dropped_total > 0
            status = await client.get_session(slow.id)
            assert status.head_frame > indices[-1]
            # PAUSE: nothing dropped, and generation waited for the reader
            pindices = [f.index for f in paused_frames]
            assert pindices == list(range(pindices[0], pindices[0] + len(pindices)))
            assert paused_frames[-1].frame.dropped_total == 0
            head = (await client.get_session(paused.id)).head_frame
            assert head <= pindices[-1] + 1 + 2 + 4 + 1  # + window + out queue + in flight


async def test_a_paused_session_alone_goes_on_when_its_reader_catches_up(mesh: Mesh) -> None:
    """A PAUSE session whose queue is full is not stepped; when its reader drains the
    queue, the worker's step loop must be woken (with no other session on the worker,
    nothing else would wake it)."""
    async with (
        Client(mesh.gateway) as client,
        client.session(
            MODEL, seed=4, fps=FPS, steps=1, quality="fixed", window=2, output_policy="pause"
        ) as paused,
    ):
        frames = await asyncio.wait_for(_read(paused, 3.0, delay_s=4 / FPS), 30)
        indices = [f.index for f in frames]
        assert indices == list(range(len(indices)))
        assert len(frames) >= 9  # ~3 s at a quarter of its fps (12 frames): it never stalled


async def test_a_paused_session_held_by_its_reader_keeps_its_quality(mesh: Mesh) -> None:
    """Frames a PAUSE session could not make because its reader was behind are not the
    worker's deadline misses: an adaptive session on an idle worker read at a quarter of
    its fps keeps its steps and fps."""
    async with (
        Client(mesh.gateway) as client,
        client.session(MODEL, seed=5, fps=FPS, window=2, output_policy="pause") as paused,
    ):
        frames = await asyncio.wait_for(_read(paused, 3.0, delay_s=4 / FPS), 30)
        assert len(frames) >= 9
        changes = [e for e in paused.events if e.kind == pb.SessionEvent.KIND_QUALITY_CHANGED]
        assert changes == []
        assert {f.frame.steps for f in frames} == {frames[0].frame.steps}


async def test_admission_refuses_what_the_worker_cannot_serve_on_time(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        # far past the worker's budget at any quality: refused with a retry-after hint
        with pytest.raises(errors.ResourceExhausted) as refused:
            await client.create_session(MODEL, fps=120, steps=4, quality="fixed")
        assert refused.value.retry_after_s and refused.value.retry_after_s >= 1.0
        # fill it: sessions are admitted only while their fps fits, far below 64 slots
        opened = []
        try:
            with pytest.raises(errors.ResourceExhausted):
                for i in range(64):
                    opened.append(await client.create_session(MODEL, seed=i, fps=24, steps=2))
            assert 1 <= len(opened) < 64
            # a closed session's headroom comes back
            await client.close_session(opened.pop().session_id)
            for _ in range(20):  # the worker re-publishes its headroom to the router
                try:
                    opened.append(await client.create_session(MODEL, fps=24, steps=2))
                    break
                except errors.ResourceExhausted:
                    await asyncio.sleep(0.2)
            else:
                pytest.fail("no session admitted after one was closed")
        finally:
            for info in opened:
                await client.close_session(info.session_id)


async def test_a_control_sent_just_in_time_starts_its_frame_early_at_the_session_fps(
    mesh: Mesh,
) -> None:
    """A control that arrives shortly before its frame's deadline lets that frame start at
    once (up to a quarter interval early) without raising the session's frame rate."""
    frames: list[ReceivedFrame] = []
    stamped: list[int] = []
    async with (
        Client(mesh.gateway) as client,
        client.session(MODEL, fps=FPS, steps=1, quality="fixed") as session,
    ):

        async def read() -> None:
            async for frame in session.frames():
                frames.append(frame)
                if len(frames) >= 48:
                    return

        reader = asyncio.create_task(read())
        while not reader.done():
            await asyncio.sleep(2.5 / FPS)
            stamped.append(await session.send_just_in_time(1 + len(stamped) % 4))
        await reader
        errors_seen = list(session.errors)
    by_index = {f.index: f for f in frames}
    early = [
        by_index[i]
        for i in stamped
        if i in by_index
        and by_index[i].frame.timestamps.model_start_us < by_index[i].frame.timestamps.due_us
    ]
    assert early, "no frame with a control waiting started before its deadline"
    for f in early:  # never more than a quarter interval early
        lead_us = f.frame.timestamps.due_us - f.frame.timestamps.model_start_us
        assert lead_us <= 0.25e6 / FPS + 1000
    assert _fps(frames[8:]) <= FPS * 1.05  # the grid did not move
    assert len(errors_seen) <= len(stamped) // 2  # late ones are refused as in the past
