"""A tiny deterministic WorldModel for unit tests of pure runtime logic (no training)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.worker.models.base import Control, ModelInfo, SessionState, WorldModel
from windflow.errors import InvalidArgument, SnapshotError


class FakeState(SessionState):
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.frame_index = 0
        self.position = seed % 16


class FakeWorld(WorldModel):
    """A dot on a 16x16 grid moved by actions; frames are a pure function of the state."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            model_id="fake-world",
            version="test",
            description="unit-test fake",
            width=16,
            height=16,
            fps=24.0,
            actions=("noop", "left", "right"),
        )

    def new_state(self, seed: int) -> FakeState:
        return FakeState(seed)

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        if steps not in self.info.steps:
            raise InvalidArgument(f"steps {steps} not on the ladder")
        for c in controls:
            self.validate_control(c)
        out = np.zeros((len(states), 16, 16, 3), dtype=np.uint8)
        for i, (state, control) in enumerate(zip(states, controls, strict=True)):
            assert isinstance(state, FakeState)
            state.position = (state.position + (0, -1, 1)[control.action]) % 16
            out[i, 8, state.position] = (255, steps * 60, state.frame_index % 256)
            state.frame_index += 1
        return out

    def snapshot(self, state: SessionState) -> bytes:
        assert isinstance(state, FakeState)
        return np.array([state.seed, state.frame_index, state.position], np.int64).tobytes()

    def restore(self, data: bytes) -> FakeState:
        if len(data) != 24:
            raise SnapshotError("not a fake snapshot")
        seed, index, pos = np.frombuffer(data, np.int64)
        state = FakeState(int(seed))
        state.frame_index, state.position = int(index), int(pos)
        return state


def load_fake(**_: object) -> FakeWorld:
    return FakeWorld()
