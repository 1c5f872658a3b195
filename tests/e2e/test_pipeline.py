"""A model host holding two batches (the worker's default ``--pipeline-depth 2``): under a
load that makes batches run back to back, the next batch is launched while the last one
runs, and every frame is still exactly what the model makes for its seed and controls."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from services.worker.models.base import Control
from services.worker.models.registry import DEFAULT_MODEL, load_model
from tests.e2e.mesh import Mesh
from windflow.sdk import Client, ReceivedFrame, Session

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = DEFAULT_MODEL
SESSIONS = 4
FRAMES = 60
STEPS = 4  # a batch of 4 takes ~20 ms here: far over the 8.3 ms interval


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(
        tmp_path_factory.mktemp("pipeline"),
        workers=1,
        worker_args=("--admission", "slots", "--capacity", "16"),
    ) as m:
        yield m


def _controls(seed: int) -> list[tuple[int, int]]:
    return [(i * 7, (seed + i) % 5) for i in range(FRAMES // 7 + 1)]


async def test_back_to_back_batches_are_pipelined_and_bit_exact(mesh: Mesh) -> None:
    async def run(seed: int) -> list[ReceivedFrame]:
        async with (
            Client(mesh.gateway) as client,
            client.session(
                MODEL,
                seed=seed,
                fps=120,  # four sessions at 120 fps, K=4: more than one model host makes
                steps=STEPS,
                quality="fixed",
                format="rgb",
                output_policy="pause",
                controls=_controls(seed),
            ) as session,
        ):
            out = [f async for f in session.frames(limit=FRAMES)]
            assert not session.errors
            return out

    seeds = [31 + i for i in range(SESSIONS)]
    runs = await asyncio.gather(*(run(s) for s in seeds))

    model = load_model(MODEL)
    launched_early = 0
    for seed, frames in zip(seeds, runs, strict=True):
        assert [f.index for f in frames] == list(range(FRAMES))
        state = model.new_state(seed)
        actions = dict(_controls(seed))
        action = 0
        for f in frames:
            action = actions.get(f.index, action)
            want = model.step([state], [Control(action=action)], STEPS)[0]
            assert f.frame.action == action
            assert np.array_equal(f.rgb(), want), f"seed {seed}, frame {f.index}"
        for before, after in itertools.pairwise(frames):
            ts = after.frame.timestamps
            launched_us = ts.model_start_us - after.frame.latency.queue_ms * 1000
            # launched before the frame before it was made: it waited in the host
            launched_early += launched_us < before.frame.timestamps.model_end_us - 100
    assert launched_early >= SESSIONS * FRAMES // 4, launched_early


async def test_forks_restore_while_batches_are_in_flight(mesh: Mesh) -> None:
    """A fork restores its state on the (one) worker while the sessions there keep
    batches in its model host back to back: the restore goes through the step thread
    and waits its turn between batches (on the event loop it would deadlock)."""

    async def keep_reading(session: Session) -> None:
        async for _ in session.frames():
            pass

    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(mesh.gateway))
        busy = [
            await stack.enter_async_context(
                client.session(MODEL, seed=50 + i, fps=120, steps=STEPS, quality="fixed")
            )
            for i in range(SESSIONS)
        ]
        readers = [asyncio.create_task(keep_reading(s)) for s in busy]
        try:
            await asyncio.sleep(1.0)  # past the first in-memory snapshots
            for _ in range(5):
                head = (await client.get_session(busy[0].id)).head_frame
                child = await asyncio.wait_for(client.fork(busy[0].id, head - 1), 30)
                held = await client.get_session(child.session_id)  # the worker's own head
                assert held.head_frame == head - 1
                await client.close_session(child.session_id)
            assert not any(r.done() for r in readers)  # the load never stopped
        finally:
            for r in readers:
                r.cancel()
