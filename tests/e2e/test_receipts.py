"""Control receipts with real services (issue 23, docs/mesh.md "The stream"): the worker
confirms each accepted control with the frame it applies from, ahead of the frames
waiting to go out; a refused one is answered by its StreamError; every frame lists the
controls first applied in it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.common import telemetry
from windflow.sdk import Client, ReceivedFrame, Session
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPEC: dict[str, object] = {"fps": 12.0, "steps": 1, "quality": "fixed"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path_factory.mktemp("receipts"), workers=1) as m:
        yield m


@pytest_asyncio.fixture(loop_scope="module")
async def client(mesh: Mesh) -> AsyncIterator[Client]:
    async with Client(mesh.gateway) as c:
        yield c


@contextlib.asynccontextmanager
async def reading(session: Session) -> AsyncIterator[list[ReceivedFrame]]:
    """The session's frames, read in the background (what takes its receipts)."""
    frames: list[ReceivedFrame] = []

    async def pump() -> None:
        async for frame in session.frames():
            frames.append(frame)

    task = asyncio.create_task(pump())
    try:
        yield frames
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(done: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {what} in {timeout_s} s")


async def test_each_accepted_control_gets_a_receipt_before_its_frame(client: Client) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=4, **SPEC)  # type: ignore[arg-type]
    live = await client.attach(info, controls=[(0, 1)])
    try:
        async with reading(live) as frames:
            await until(lambda: bool(frames), "frame")
            # the attach's own control was confirmed right after KIND_ATTACHED
            assert live.receipts and live.receipts[0].frame_index == 0
            target = live.next_index + 6
            sent = telemetry.now_us()
            receipt = await live.send_confirmed(action=2, frame_index=target)
            took_ms = (telemetry.now_us() - sent) / 1000
            assert receipt.frame_index == target
            assert sent <= receipt.received_us
            assert took_ms < 1000 / 12  # (long before its frame: a network round trip)
            assert max(f.index for f in frames) < target  # it came before its frame
            # two controls for one frame: the frame lists both, in the order sent
            later = target + 4
            first = await live.send_confirmed(action=3, frame_index=later)
            second = await live.send_confirmed(action=4, frame_index=later)
            assert first.client_time_us < second.client_time_us
            await until(lambda: any(f.index > later for f in frames), f"frame {later + 1}")
            by_index = {f.index: f.frame for f in frames}
            made = by_index[target]
            assert made.action == 2 and list(made.applied_client_time_us) == [
                receipt.client_time_us
            ]
            both = by_index[later]
            assert both.action == 4
            assert list(both.applied_client_time_us) == [
                first.client_time_us,
                second.client_time_us,
            ]
            assert both.control_client_time_us == second.client_time_us
            assert not by_index[later + 1].applied_client_time_us  # (sticky, not new)
    finally:
        await live.aclose()
        await client.close_session(info.session_id)


async def test_a_refused_control_is_answered_with_its_error(client: Client) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=5, **SPEC)  # type: ignore[arg-type]
    live = await client.attach(info)
    viewer = await client.spectate(info)
    try:
        async with reading(live) as frames, reading(viewer):
            await until(lambda: bool(frames), "frame")
            with pytest.raises(errors.InvalidArgument, match="outside the action space"):
                await live.send_confirmed(action=99)
            with pytest.raises(errors.InvalidArgument, match="in the past"):
                await live.send_confirmed(action=1, frame_index=0)
            with pytest.raises(errors.PermissionDenied, match="spectator"):
                await viewer.send_confirmed(action=1)
            assert not viewer.receipts  # (a spectator gets no receipt)
            ok = await live.send_confirmed(action=1)  # the stream went on
            assert ok.frame_index >= 1
            assert all(r.client_time_us != 0 for r in live.receipts)
            assert [e.code_name for e in live.errors] == ["INVALID_ARGUMENT"] * 2
            assert all(isinstance(e, pb.StreamError) for e in live.errors)
    finally:
        await viewer.aclose()
        await live.aclose()
        await client.close_session(info.session_id)
