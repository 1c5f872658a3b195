"""Lockstep sessions with real services (docs/simulation.md): no clock, a frame as soon as
its control is in; nothing made without one; bit-exact with a replay and through a fork;
an interactive session beside busy lockstep ones keeps its fps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.sdk import Client, ReceivedFrame, Session
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

FPS = 12.0
SIM: dict[str, object] = {"fps": FPS, "steps": 1, "session_class": "lockstep", "format": "rgb"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(
        tmp_path_factory.mktemp("lockstep"), workers=1, worker_args=("--capacity", "64")
    ) as m:
        yield m


@pytest_asyncio.fixture(loop_scope="module")
async def client(mesh: Mesh) -> AsyncIterator[Client]:
    async with Client(mesh.gateway) as c:
        yield c


class Reader:
    """A session's frames, read in the background (a read cancelled mid-way would cancel
    the stream's call)."""

    def __init__(self, session: Session) -> None:
        self.frames: list[ReceivedFrame] = []
        self._more = asyncio.Event()
        self._task = asyncio.create_task(self._pump(session))

    async def _pump(self, session: Session) -> None:
        async for frame in session.frames():
            self.frames.append(frame)
            self._more.set()

    async def take(self, n: int, timeout_s: float = 10.0) -> list[ReceivedFrame]:
        """The next ``n`` frames not taken yet."""
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < n:
            self._more.clear()
            left = deadline - time.monotonic()
            if left <= 0 or self._task.done():
                if self._task.done():
                    self._task.result()
                raise TimeoutError(f"{len(self.frames)} of {n} frames in {timeout_s} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), left)
        taken, self.frames = self.frames[:n], self.frames[n:]
        return taken

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_lockstep_session_makes_a_frame_per_control_as_fast_as_it_can(
    client: Client,
) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=3, **SIM)  # type: ignore[arg-type]
    assert info.spec.session_class == pb.SESSION_CLASS_LOCKSTEP
    assert info.spec.output_policy == pb.OUTPUT_POLICY_PAUSE  # (its default)
    live = await client.attach(info)
    reader = Reader(live)
    try:
        # no control: no frame (it costs nothing)
        with pytest.raises(TimeoutError):
            await reader.take(1, timeout_s=0.8)
        actions = [(k // 3) % len(info.model.actions) for k in range(36)]
        started = time.monotonic()
        for k, action in enumerate(actions):
            await live.send(action=action, frame_index=k)
        frames = await reader.take(len(actions))
        took = time.monotonic() - started
        assert [f.index for f in frames] == list(range(len(actions)))
        assert [f.frame.action for f in frames] == actions
        assert took < 0.6 * len(actions) / FPS  # not paced by its fps
        # bit-exact: the replay of its log makes the same frames
        replayed = [f async for f in client.replay(info.session_id, 0, len(actions))]
        assert [r.frame.data for r in replayed] == [f.frame.data for f in frames]
        # a fork is lockstep too, and goes on from the same state
        fork = await client.fork(info.session_id, 20)
        assert fork.spec.session_class == pb.SESSION_CLASS_LOCKSTEP
        branch = await client.attach(fork)
        branch_reader = Reader(branch)
        try:
            for k in range(20, 30):
                await branch.send(action=actions[k], frame_index=k)
            again = await branch_reader.take(10)
            assert [f.frame.data for f in again] == [f.frame.data for f in frames[20:30]]
        finally:
            await branch_reader.aclose()
            await branch.aclose()
            await client.close_session(fork.session_id)
    finally:
        await reader.aclose()
        await live.aclose()
        await client.close_session(info.session_id)


async def _drive(client: Client, seed: int, until: float) -> int:
    """A simulation loop: a control, then its frame, as fast as the worker answers."""
    info = await client.create_session(DEFAULT_MODEL, seed=seed, **SIM)  # type: ignore[arg-type]
    live = await client.attach(info)
    made = 0
    try:
        frames = live.frames()
        while time.monotonic() < until:
            await live.send(action=made % 5, frame_index=made)
            await asyncio.wait_for(anext(frames), 5.0)
            made += 1
    finally:
        await live.aclose()
        await client.close_session(info.session_id)
    return made


async def test_an_interactive_session_keeps_its_fps_beside_busy_lockstep_ones(
    client: Client,
) -> None:
    spec: dict[str, object] = {"fps": 24.0, "steps": 1, "quality": "fixed"}
    info = await client.create_session(DEFAULT_MODEL, seed=9, **spec)  # type: ignore[arg-type]
    player = await client.attach(info)
    reader = Reader(player)
    try:
        await reader.take(12)  # under way
        until = time.monotonic() + 4.0
        sims = [asyncio.create_task(_drive(client, 100 + i, until)) for i in range(4)]
        await asyncio.sleep(until - time.monotonic())
        got = reader.frames
        made = await asyncio.gather(*sims)
        span = (got[-1].received_us - got[0].received_us) / 1e6
        fps = (len(got) - 1) / span
        assert fps >= 0.9 * 24.0, f"the player got {fps:.1f} fps beside {made} lockstep frames"
        assert sum(made) > 4 * 24  # the simulations made frames meanwhile, many of them
    finally:
        await reader.aclose()
        await player.aclose()
        await client.close_session(info.session_id)


async def test_rollouts_by_fork_many_are_bit_exact_with_fresh_sessions(client: Client) -> None:
    n_actions = 5
    history = [(k * 7) % n_actions for k in range(10)]
    info = await client.create_session(DEFAULT_MODEL, seed=11, **SIM)  # type: ignore[arg-type]
    live = await client.attach(info, controls=list(enumerate(history)))
    try:
        made = [f async for f in live.frames(limit=len(history))]
        assert [f.index for f in made] == list(range(10))
    finally:
        await live.aclose()
    scripts = [[(b + k) % n_actions for k in range(6)] for b in range(16)]
    started = time.monotonic()
    branches = await client.fork_many(info.session_id, 10, 16)
    fork_ms = (time.monotonic() - started) * 1000
    assert len({b.session_id for b in branches}) == 16
    assert all(b.parent_session_id == info.session_id and b.forked_at == 10 for b in branches)
    for branch in branches:
        await client.close_session(branch.session_id)
    results = await client.rollouts(info.session_id, 10, scripts)
    assert [len(r) for r in results] == [6] * 16
    # each branch equals a fresh session given the same history and script
    for script, frames in list(zip(scripts, results, strict=True))[:3]:
        fresh = await client.create_session(DEFAULT_MODEL, seed=11, **SIM)  # type: ignore[arg-type]
        whole = list(enumerate([*history, *script]))
        stream = await client.attach(fresh, controls=whole)
        try:
            again = [f async for f in stream.frames(limit=len(whole))]
        finally:
            await stream.aclose()
            await client.close_session(fresh.session_id)
        assert [f.frame.data for f in again[10:]] == [f.frame.data for f in frames]
        assert [f.frame.action for f in frames] == script
    assert fork_ms < 5000, f"16 forks took {fork_ms:.0f} ms"  # (bench sim measures it)
    # refusals: a count outside 1..64, a frame beyond the head
    with pytest.raises(errors.InvalidArgument):
        await client.fork_many(info.session_id, 10, 0)
    with pytest.raises(errors.InvalidArgument):
        await client.fork_many(info.session_id, 10, 65)
    with pytest.raises(errors.OutOfRange):
        await client.fork_many(info.session_id, 11, 2)
    await client.close_session(info.session_id)
