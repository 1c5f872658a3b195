"""Recovery: kill -9 the worker holding a session mid-stream, or the model host process
under it, or stop the worker gracefully (SIGTERM, as an orchestrator does on a rolling
restart: its sessions migrate live); the client sees every frame index exactly once, each
equal to an uninterrupted reference run. And a rolling restart with no spare worker (no
live migration can go anywhere): the session waits for the replacement and resumes on it
as after a crash."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.v1 import windflow_pb2 as pb

FRAMES = 300
KILL_AT = 100
WORKER_ARGS = ("--lease-ttl", "2", "--heartbeat", "0.5", "--checkpoint-every", "48")
# fixed quality: each run is compared with a separate reference run, and an adaptive session
# may step down its denoising steps when a loaded machine makes it late (the log replays
# whatever steps were used, but the reference would not)
SPEC = {"seed": 77, "format": "rgb", "output_policy": "pause", "fps": 48.0, "quality": "fixed"}


async def _new_session(client: Client) -> pb.Session:
    return await client.create_session(DEFAULT_MODEL, **SPEC)  # type: ignore[arg-type]


async def _stream(
    client: Client,
    info: pb.Session,
    at_frame: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[list[tuple[int, bytes]], Session]:
    """FRAMES frames of ``info`` under a fixed script of actions, each control sent 40
    frames ahead of its frame as the stream runs; ``at_frame`` sees each index as it
    arrives. Returns every frame's (index, data), and the stream (its events and errors)."""
    n = len(info.model.actions)
    controls = [(f, (f // 9) % n) for f in range(0, FRAMES, 9)]
    live = await client.attach(info, controls=controls[:20])
    got: list[tuple[int, bytes]] = []
    async for frame in live.frames(limit=FRAMES):
        got.append((frame.index, frame.frame.data))
        for f, a in controls[20:]:
            if f == frame.index + 40:
                await live.send(action=a, frame_index=f)
        if at_frame is not None:
            await at_frame(frame.index)
    await live.aclose()
    return got, live


def _assert_resumed_exactly(
    got: list[tuple[int, bytes]],
    reference: list[tuple[int, bytes]],
    live: Session,
    kind: int = pb.SessionEvent.KIND_RECOVERED,
) -> None:
    assert [i for i, _ in got] == list(range(FRAMES))  # no gap, no repeat
    assert [d for _, d in got] == [d for _, d in reference]  # bit-exact across the move
    moves = [
        e.kind
        for e in live.events
        if e.kind in (pb.SessionEvent.KIND_RECOVERED, pb.SessionEvent.KIND_MIGRATED)
    ]
    assert moves == [kind]


@pytest.mark.parametrize("victim_process", ["worker", "model host", "worker, gracefully"])
async def test_worker_killed_mid_stream_no_gap_no_repeat(
    tmp_path: Path, victim_process: str
) -> None:
    mesh = Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS)
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            reference, _ = await _stream(client, await _new_session(client))
            info = await _new_session(client)
            victim = ""

            async def stop_its_worker(index: int) -> None:
                nonlocal victim
                if index != KILL_AT:
                    return
                victim = (await client.get_session(info.session_id)).worker_id
                if victim_process == "worker":
                    mesh.kill(victim)
                elif victim_process == "model host":
                    # the worker exits at once and its sessions recover elsewhere
                    mesh.kill_model_host(victim)
                else:  # it drains: its sessions migrate live to the other worker
                    mesh.terminate(victim)

            got, live = await _stream(client, info, stop_its_worker)

            graceful = victim_process == "worker, gracefully"
            _assert_resumed_exactly(
                got,
                reference,
                live,
                pb.SessionEvent.KIND_MIGRATED if graceful else pb.SessionEvent.KIND_RECOVERED,
            )
            after = await client.get_session(info.session_id)
            assert after.worker_id != victim and after.placement_epoch == 2
            if victim_process == "worker, gracefully":
                assert await mesh.procs[victim].wait() == 0  # a clean exit, not a crash
                assert not live.errors  # nothing refused on the way (no fenced appends)
                assert "drain: 1 of 1 migrated" in mesh.log(victim)
            if victim_process == "model host":
                assert "died" in mesh.log(victim) and "sessions recover elsewhere" in mesh.log(
                    victim
                )
    finally:
        await mesh.aclose()


async def test_only_worker_restarted_session_waits_for_the_replacement(tmp_path: Path) -> None:
    """A rolling restart with no spare capacity: the only worker drains and exits, and its
    replacement starts only then (seconds to load the model). Meanwhile no live worker
    serves the model: the router answers the gateway's recovery UNAVAILABLE (retry), not
    NOT_FOUND (which would end the client's stream), until the replacement registers."""
    mesh = Mesh(tmp_path, workers=1, worker_args=WORKER_ARGS)
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            first = await _new_session(client)
            reference, _ = await _stream(client, first)
            await client.close_session(first.session_id)
            info = await _new_session(client)

            async def restart(index: int) -> None:
                if index == KILL_AT:
                    mesh.terminate("worker-1")
                    mesh.add_worker()  # worker-2, starting now

            got, live = await _stream(client, info, restart)

            _assert_resumed_exactly(got, reference, live)
            assert await mesh.procs["worker-1"].wait() == 0
            assert not live.errors
            after = await client.get_session(info.session_id)
            # (worker-2 was started after worker-1 drained: the recovery waited for it)
            assert after.worker_id == "worker-2" and after.placement_epoch == 2
    finally:
        await mesh.aclose()
