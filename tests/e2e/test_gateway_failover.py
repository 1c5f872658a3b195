"""A gateway killed mid-stream: the SDK resumes the stream by itself, through another
gateway or the same one once the supervisor has restarted it, and its client sees every
frame index exactly once, each bit-identical to the Replay of the session and shaped by
the controls it sent (those not yet delivered are re-sent with the resume).

The stack is ``windflow up``'s (``Stack`` with two gateways, one worker), so a killed
gateway comes back on its port, as in production."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import logged_stack
from windflow.infra import Stack
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

FRAMES = 150
KILL_AT = 50
CONTROL_EVERY = 9
CONTROL_AHEAD = 30
"""Each control is sent this many frames ahead of its frame: always still in the future
(a PAUSE session runs at most its window and queue, 12 frames, ahead of its client), and
some are waiting in the mesh when the gateway dies, so the resume must re-send them."""
# fixed quality and PAUSE: no frame is dropped and no step count changes under load
SPEC = {"seed": 23, "format": "rgb", "output_policy": "pause", "fps": 48.0, "quality": "fixed"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with logged_stack(tmp_path_factory.mktemp("stack"), workers=1, gateways=2) as running:
        yield running


def _action(index: int, actions: int) -> int:
    """The scripted action in force at frame ``index``: a new one every CONTROL_EVERY."""
    return (index // CONTROL_EVERY) % actions


async def _stream(
    client: Client, info: pb.Session, at_frame: Callable[[int], None]
) -> tuple[list[tuple[int, int, bytes]], Session]:
    """FRAMES frames of ``info``, a control every CONTROL_EVERY frames sent CONTROL_AHEAD
    frames ahead; ``at_frame`` sees each index as it arrives. Returns each frame's
    (index, action, data) and the stream."""
    n = len(info.model.actions)
    script = [(f, _action(f, n)) for f in range(0, FRAMES, CONTROL_EVERY)]
    live = await client.attach(info, controls=[c for c in script if c[0] < CONTROL_AHEAD])
    got = []
    async for frame in live.frames(limit=FRAMES):
        got.append((frame.index, frame.frame.action, frame.frame.data))
        for f, action in script:
            if f == frame.index + CONTROL_AHEAD:
                await live.send(action=action, frame_index=f)
        at_frame(frame.index)
    await live.aclose()
    return got, live


def _kill(stack: Stack, name: str) -> int:
    """SIGKILL the current incarnation of child ``name``; returns its pid."""
    pid = stack.supervisor.pids()[name]
    os.kill(pid, signal.SIGKILL)
    return pid


async def _assert_exact(
    client: Client, info: pb.Session, got: list[tuple[int, int, bytes]], live: Session
) -> None:
    assert [i for i, _, _ in got] == list(range(FRAMES))  # no gap, no repeat
    n = len(info.model.actions)
    # every control reached its frame, those re-sent with the resume too
    assert [a for _, a, _ in got] == [_action(i, n) for i in range(FRAMES)]
    assert not live.errors
    replay = [(f.index, f.frame.data) async for f in client.replay(info.session_id, 0, FRAMES)]
    assert replay == [(i, d) for i, _, d in got]  # bit-identical to what the log makes
    assert live.resumes >= 1
    assert [e for e in live.events if e.kind == pb.SessionEvent.KIND_RECOVERED]


async def test_gateway_killed_mid_stream_resumes_through_the_other(stack: Stack) -> None:
    first, second = stack.gateway_addresses
    async with (
        Client([first, second], token=stack.token) as client,
        Client(second, token=stack.token) as other,
    ):
        info = await client.create_session(DEFAULT_MODEL, **SPEC)  # type: ignore[arg-type]
        killed: list[int] = []

        def kill_its_gateway(index: int) -> None:
            if index == KILL_AT:
                killed.append(_kill(stack, "gateway"))

        got, live = await _stream(client, info, kill_its_gateway)

        assert killed and live.gateway == second
        resumed = [e for e in live.events if e.kind == pb.SessionEvent.KIND_RECOVERED]
        assert f"through gateway {second}" in resumed[0].message
        await _assert_exact(other, info, got, live)  # (the first may still be restarting)
        deaths = [e for e in stack.supervisor.exits if e.pid in killed]
        assert [(e.name, e.description, e.restarting) for e in deaths] == [
            ("gateway", "signal SIGKILL", True)
        ]


async def test_gateway_killed_mid_stream_resumes_through_it_once_restarted(
    stack: Stack,
) -> None:
    """A client that knows one gateway only: the stream waits for the supervisor to bring
    it back on its port (backoff, then start-up: seconds) and resumes there."""
    second = stack.gateway_addresses[1]
    async with Client(second, token=stack.token) as client:
        info = await client.create_session(DEFAULT_MODEL, **SPEC)  # type: ignore[arg-type]
        killed: list[int] = []

        def kill_its_gateway(index: int) -> None:
            if index == KILL_AT:
                killed.append(_kill(stack, "gateway-2"))

        got, live = await _stream(client, info, kill_its_gateway)

        assert killed and stack.supervisor.pids()["gateway-2"] != killed[0]  # restarted
        await _assert_exact(client, info, got, live)
