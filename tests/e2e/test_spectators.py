"""Spectators over gRPC with real services (services/worker/viewers.py): read-only viewers
of a live session get its frames as they are made, once made; a slow one costs only
itself; the controller role is handed over; every refusal is in-stream or a status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.sdk import Client, ReceivedFrame, Session
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

FPS = 12.0
SPEC: dict[str, object] = {"fps": FPS, "steps": 1, "quality": "fixed", "width": 64, "height": 64}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path_factory.mktemp("spectators"), workers=1) as m:
        yield m


@pytest_asyncio.fixture(loop_scope="module")
async def client(mesh: Mesh) -> AsyncIterator[Client]:
    async with Client(mesh.gateway) as c:
        yield c


class Watch:
    """Reads a session's stream in the background: its frames by index, and its events
    and errors as they come (an event with no frame after it is seen too)."""

    def __init__(self, session: Session, delay_s: float = 0.0) -> None:
        self.session = session
        self.delay_s = delay_s
        self.frames: dict[int, ReceivedFrame] = {}
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for frame in self.session.frames():
            self.frames[frame.index] = frame
            if self.delay_s:
                await asyncio.sleep(self.delay_s)

    async def frames_for(self, seconds: float) -> dict[int, ReceivedFrame]:
        """The frames that come in the next ``seconds``."""
        before = set(self.frames)
        await asyncio.sleep(seconds)
        return {i: f for i, f in self.frames.items() if i not in before}

    async def _until(self, found: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + 5.0
        while not found():
            if self.task.done():
                self.task.result()  # (its error)
                raise AssertionError(f"the stream ended before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in 5 s")
            await asyncio.sleep(0.02)

    async def event(self, kind: pb.SessionEvent.Kind.ValueType) -> pb.SessionEvent:
        def first() -> pb.SessionEvent | None:
            return next((e for e in self.session.events if e.kind == kind), None)

        await self._until(first, pb.SessionEvent.Kind.Name(kind))
        seen = first()
        assert seen is not None
        self.session.events.remove(seen)
        return seen

    async def error(self) -> pb.StreamError:
        await self._until(lambda: self.session.errors, "StreamError")
        return self.session.errors.popleft()

    async def ended(self) -> BaseException | None:
        """How its stream ended (within 5 s)."""
        await asyncio.wait_for(asyncio.wait([self.task]), 5.0)
        return self.task.exception()

    async def aclose(self) -> None:
        await self.session.aclose()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_spectators_see_the_frames_the_controller_gets_made_once(client: Client) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=5, **SPEC)  # type: ignore[arg-type]
    player = Watch(await client.attach(info))
    viewers = [Watch(await client.spectate(info)) for _ in range(3)]
    try:
        await player.session.send(action=2, frame_index=6)
        await asyncio.sleep(3.0)
        mine = player.frames
        assert len(mine) >= 2.0 * FPS
        for viewer in viewers:
            seen = viewer.frames
            common = set(seen) & set(mine)
            assert len(common) >= 0.8 * len(mine)  # (a spectator may join a frame late)
            for index in common:  # the same frame: its bytes and what made it
                assert seen[index].frame.data == mine[index].frame.data
                assert seen[index].frame.action == mine[index].frame.action
            assert {seen[i].frame.action for i in common if i >= 6} == {2}
        # each stream was told its role and id
        attached = [w.session.events[0] for w in (player, *viewers)]
        assert [a.kind for a in attached] == [pb.SessionEvent.KIND_ATTACHED] * 4
        assert [a.role for a in attached] == [pb.ROLE_CONTROLLER] + [pb.ROLE_SPECTATOR] * 3
        assert len({a.viewer_id for a in attached}) == 4
        # (the three attached concurrently: each counted those there by then) a fourth,
        # attached after, counts every spectator, itself included
        late = await client.spectate(info)
        try:
            first = await anext(late.frames())
            assert first.index > 0
            assert late.events[0].spectators == 4
        finally:
            await late.aclose()
    finally:
        for w in (player, *viewers):
            await w.aclose()
        await client.close_session(info.session_id)


async def test_a_slow_spectator_costs_only_itself(client: Client) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=6, **SPEC)  # type: ignore[arg-type]
    player = Watch(await client.attach(info))
    fast = Watch(await client.spectate(info))
    slow = Watch(await client.spectate(info), delay_s=4 / FPS)  # a quarter of its fps
    try:
        await asyncio.sleep(3.0)
        mine, quick, lagging = player.frames, fast.frames, slow.frames
        assert len(quick) >= 0.9 * len(mine)
        assert len(lagging) <= 0.5 * len(mine)
        assert lagging[max(lagging)].frame.dropped_total > 0  # its own drops, in its frames
        assert max(mine) - max(lagging) <= 6  # the newest first: it is not far behind
        assert mine[max(mine)].frame.dropped_total == 0  # none of them the player's
        assert quick[max(quick)].frame.dropped_total == 0
        # the player's frames came at the session's fps: nothing held it back
        span = (mine[max(mine)].received_us - mine[min(mine)].received_us) / 1e6
        assert (len(mine) - 1) / span >= 0.9 * FPS
    finally:
        for w in (player, fast, slow):
            await w.aclose()
        await client.close_session(info.session_id)


async def test_refusals_of_spectators_and_second_controllers(client: Client) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=7, **SPEC)  # type: ignore[arg-type]
    player = Watch(await client.attach(info))
    viewer = Watch(await client.spectate(info))
    try:
        await asyncio.sleep(0.5)
        # a control from a spectator: refused in-stream, its stream goes on
        await viewer.session.send(action=1)
        refused = await viewer.error()
        assert refused.code_name == "PERMISSION_DENIED"
        assert "spectator" in refused.message
        assert len(await viewer.frames_for(0.5)) > 0
        # a second controller: FAILED_PRECONDITION, naming the way in
        second = Watch(await client.attach(info))
        assert isinstance(await second.ended(), errors.FailedPrecondition)
        assert "already has a controller" in str(second.task.exception())
        await second.aclose()
        # a handover from the controller to a viewer not attached: NOT_FOUND in-stream
        await player.session.handover("v-nobody")
        assert (await player.error()).code_name == "NOT_FOUND"
        # a spectator handing the role to another, or taking it while it is held
        await viewer.session.handover("v-other")
        assert (await viewer.error()).code_name == "PERMISSION_DENIED"
        await viewer.session.handover()
        assert (await viewer.error()).code_name == "FAILED_PRECONDITION"
        # a spectator's Attach with controls or a resume
        bad = Watch(await client.attach(info, role=pb.ROLE_SPECTATOR, controls=[(90, 1)]))
        assert isinstance(await bad.ended(), errors.PermissionDenied)
        bad = Watch(await client.attach(info, role=pb.ROLE_SPECTATOR, resume_from=3))
        assert isinstance(await bad.ended(), errors.InvalidArgument)
        assert "cannot resume" in str(bad.task.exception())
        # the player's session went on through all of it
        assert len(await player.frames_for(1.0)) >= 0.8 * FPS
    finally:
        for w in (player, viewer):
            await w.aclose()
        await client.close_session(info.session_id)


async def test_the_controller_role_is_handed_over_and_taken_when_free(client: Client) -> None:
    info = await client.create_session(DEFAULT_MODEL, seed=8, **SPEC)  # type: ignore[arg-type]
    player = Watch(await client.attach(info))
    viewer = Watch(await client.spectate(info))
    other = Watch(await client.spectate(info))
    try:
        await asyncio.sleep(0.5)
        assert viewer.session.viewer_id
        await player.session.handover(viewer.session.viewer_id)
        changed = await viewer.event(pb.SessionEvent.KIND_ROLE_CHANGED)
        assert (changed.role, changed.viewer_id) == (pb.ROLE_CONTROLLER, viewer.session.viewer_id)
        assert viewer.session.role == pb.ROLE_CONTROLLER
        assert (await player.event(pb.SessionEvent.KIND_ROLE_CHANGED)).role == pb.ROLE_SPECTATOR
        told = await other.event(pb.SessionEvent.KIND_ROLE_CHANGED)
        assert (told.viewer_id, told.role) == (viewer.session.viewer_id, pb.ROLE_SPECTATOR)
        # the new controller's control takes effect; the old one's is refused
        at = viewer.session.next_index + 3
        await viewer.session.send(action=3, frame_index=at)
        await player.session.send(action=1)
        assert (await player.error()).code_name == "PERMISSION_DENIED"
        await asyncio.sleep(1.5)
        for watch in (viewer, other):
            later = {f.frame.action for i, f in watch.frames.items() if i >= at}
            assert later == {3}
        # the controller leaves: the session pauses, its spectators are told, one takes it
        await viewer.aclose()
        left = await other.event(pb.SessionEvent.KIND_ROLE_CHANGED)
        assert left.viewer_id == ""
        await other.session.handover()
        took = await other.event(pb.SessionEvent.KIND_ROLE_CHANGED)
        assert (took.viewer_id, took.role) == (other.session.viewer_id, pb.ROLE_CONTROLLER)
        assert len(await other.frames_for(1.0)) >= 0.6 * FPS  # made again, for it
    finally:
        for w in (player, viewer, other):
            await w.aclose()
        await client.close_session(info.session_id)
