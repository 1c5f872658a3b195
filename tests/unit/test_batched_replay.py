"""Restore replays batched across sessions (``services/worker/replay.py``): the same
states as each replayed alone, in fewer, larger steps; a failing step fails only its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import pytest

from services.worker.journal import replay_steps
from services.worker.models.base import Control, SessionState
from services.worker.replay import BatchedReplay
from tests.fakes import FakeState, FakeWorld
from windflow.errors import InvalidArgument
from windflow.v1 import internal_pb2

T = TypeVar("T")


class CountingWorld(FakeWorld):
    """FakeWorld that records each step's batch size; a seed in ``broken`` fails its step."""

    def __init__(self, broken: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.broken = broken

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        self.batches.append(len(states))
        if any(isinstance(s, FakeState) and s.seed in self.broken for s in states):
            raise InvalidArgument("this step fails on purpose")
        return super().step(states, controls, steps)


async def inline(fn: Callable[[], T]) -> T:
    await asyncio.sleep(0)  # (a hop, as to the step thread)
    return fn()


def log_of(seed: int) -> list[internal_pb2.LogEntry]:
    return [
        internal_pb2.LogEntry(frame_index=f, action=(f // 3 + seed) % 3, steps=1 + f % 2)
        for f in range(0, 40, 3)
    ]


def fingerprint(state: SessionState) -> tuple[int, int]:
    assert isinstance(state, FakeState)
    return state.frame_index, state.position


async def test_batched_replays_equal_each_alone_in_fewer_steps() -> None:
    model = CountingWorld()
    replayer = BatchedReplay(inline, {"fake-world": 8})
    targets = {seed: 20 + 3 * seed for seed in range(6)}
    states = {seed: model.new_state(seed) for seed in targets}
    await asyncio.gather(
        *(replayer.replay(model, states[s], log_of(s), t, 1, {}) for s, t in targets.items())
    )
    batched_steps = len(model.batches)

    alone = CountingWorld()
    for seed, target in targets.items():
        state = alone.new_state(seed)
        replay_steps(alone, state, log_of(seed), target, 1)
        assert fingerprint(state) == fingerprint(states[seed]) == (target, state.position)
    assert sum(model.batches) == sum(alone.batches) == sum(targets.values())
    assert batched_steps < len(alone.batches) / 2  # shared batches, not one per frame
    await replayer.aclose()


async def test_a_failing_step_fails_only_its_own_restores() -> None:
    model = CountingWorld(broken=frozenset({1}))
    replayer = BatchedReplay(inline, {"fake-world": 1})  # each session its own batch
    ok, bad = model.new_state(0), model.new_state(1)
    results = await asyncio.gather(
        replayer.replay(model, ok, log_of(0), 12, 1, {}),
        replayer.replay(model, bad, log_of(1), 12, 1, {}),
        return_exceptions=True,
    )
    assert results[0] is None and ok.frame_index == 12
    assert isinstance(results[1], InvalidArgument)
    with pytest.raises(InvalidArgument):  # a later restore of it fails the same way
        await replayer.replay(model, model.new_state(1), log_of(1), 5, 1, {})
    await replayer.aclose()


async def test_a_restore_given_up_midway_does_not_stop_the_others() -> None:
    """A restore's caller cancelled while its replay runs (an OpenSession past its
    deadline): the others finish, and later restores are replayed too. (A chaos run,
    seed 3051: the runner failed setting the cancelled one's result, and every restore
    on that worker hung from then on, three sessions lost.)"""
    model = CountingWorld()
    replayer = BatchedReplay(inline, {"fake-world": 8})
    given_up = asyncio.create_task(replayer.replay(model, model.new_state(0), log_of(0), 30, 1, {}))
    kept = model.new_state(1)
    finishing = asyncio.create_task(replayer.replay(model, kept, log_of(1), 30, 1, {}))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    given_up.cancel()
    async with asyncio.timeout(5):
        await finishing
        later = model.new_state(2)
        await replayer.replay(model, later, log_of(2), 12, 1, {})
    assert (kept.frame_index, later.frame_index) == (30, 12)
    await replayer.aclose()
