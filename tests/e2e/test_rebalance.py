"""Rebalancing against the real stack (services/router/rebalance.py): when a worker joins a
loaded mesh, the router moves live sessions to it until the load is even, each by live
migration: the client sees every frame once, identical to Replay, and one KIND_MIGRATED
per move."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from tests.e2e.test_migration import SPEC, WORKER_ARGS, Player
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

REBALANCE = ("--rebalance-every-s", "0.5", "--rebalance-cooldown-s", "600")
"""A round every half second; a session moved once never moves again in the test."""
WORKERS = (*WORKER_ARGS, "--admission", "slots", "--capacity", "4")
"""Load by slots (sessions / capacity): four sessions fill worker-1 (load 1.0) and even
is 2 / 2, whatever this machine's speed (predicted utilization would depend on it)."""
FRAMES = 360
"""15 s of stream at 24 fps: worker-2's start, two moves one after the other (one move at
a time per worker), and several rounds after them that must move nothing."""


async def _until_even(client: Client, session_ids: list[str], timeout_s: float = 60.0) -> None:
    """Wait until two sessions are placed on each worker."""
    deadline = time.monotonic() + timeout_s
    while True:
        placed = [(await client.get_session(s)).worker_id for s in session_ids]
        if sorted(collections.Counter(placed).values()) == [2, 2]:
            return
        assert time.monotonic() < deadline, f"still uneven: {placed}"
        await asyncio.sleep(0.2)


async def test_a_joining_worker_gets_half_the_streaming_sessions(tmp_path: Path) -> None:
    """Four sessions stream on worker-1; worker-2 joins idle; the router moves sessions to
    it until each has two, then moves nothing more. Every stream gets every frame once,
    bit-identical to Replay; each moved one sees exactly one KIND_MIGRATED (worker-1 ->
    worker-2), the others none, and none sees KIND_RECOVERED."""
    async with Mesh(tmp_path, workers=1, worker_args=WORKERS, router_args=REBALANCE) as mesh:
        async with Client(mesh.gateway) as client:
            infos = [
                await client.create_session(DEFAULT_MODEL, seed=40 + i, **SPEC)  # type: ignore[arg-type]
                for i in range(4)
            ]
            assert {info.worker_id for info in infos} == {"worker-1"}
            n = len(infos[0].model.actions)
            lives = [
                await client.attach(
                    info, controls=[(f, (f // 4 + i) % n) for f in range(0, FRAMES, 4)]
                )
                for i, info in enumerate(infos)
            ]
            players = [Player(live, FRAMES) for live in lives]
            await asyncio.gather(*(p.at(10) for p in players))
            await mesh.add_worker().wait_ready()
            await _until_even(client, [info.session_id for info in infos])

            placed = {}
            for info, live, player in zip(infos, lives, players, strict=True):
                got = await player.task
                await live.aclose()
                assert [i for i, _, _ in got] == list(range(FRAMES))
                placed[info.session_id] = (await client.get_session(info.session_id)).worker_id
                migrated = [e for e in live.events if e.kind == pb.SessionEvent.KIND_MIGRATED]
                moves = [(e.from_worker_id, e.worker_id) for e in migrated]
                expected = (
                    [("worker-1", "worker-2")] if placed[info.session_id] == "worker-2" else []
                )
                assert moves == expected, info.session_id
                assert not [e for e in live.events if e.kind == pb.SessionEvent.KIND_RECOVERED]
                assert not live.errors
                replayed = [f.frame.data async for f in client.replay(info.session_id, 0, FRAMES)]
                assert replayed == [d for _, d, _ in got]
            # still even once every stream ended: nothing moved back or on
            assert collections.Counter(placed.values()) == {"worker-1": 2, "worker-2": 2}
            assert mesh.log("router").count("moved worker-1 -> worker-2 at frame") == 2
