"""A tiny deterministic WorldModel for unit tests of pure runtime logic (no training)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from services.worker.models.base import (
    POSE_VELOCITY,
    Control,
    InputFrameSpec,
    ModelInfo,
    PoseSpec,
    PromptSpec,
    SessionState,
    WorldModel,
)
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


class RichState(SessionState):
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.frame_index = 0
        self.acc = seed


class FakeRich(WorldModel):
    """Every kind of control declared (prompt, velocity pose, 8x8 input frames); frames are
    a pure function of the history, so a replay that got any control wrong differs."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            model_id="fake-rich",
            version="test",
            description="unit-test fake taking every kind of control",
            width=8,
            height=8,
            fps=24.0,
            actions=("noop", "go"),
            axes=("x",),
            prompt=PromptSpec(max_chars=32, default="plain"),
            pose=PoseSpec(POSE_VELOCITY, ("pitch", "yaw"), (-0.5, -0.5), (0.5, 0.5)),
            input_frame=InputFrameSpec(width=8, height=8, fps=24.0, queue=2),
        )

    def new_state(self, seed: int) -> RichState:
        return RichState(seed)

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        for c in controls:
            self.validate_control(c)
        out = np.zeros((len(states), 8, 8, 3), dtype=np.uint8)
        for i, (state, control) in enumerate(zip(states, controls, strict=True)):
            assert isinstance(state, RichState)
            h = hashlib.sha256(repr((state.acc, control.action, control.axes)).encode())
            h.update(repr((control.prompt, control.pose)).encode())
            if control.frame is not None:
                h.update(control.frame.rgb.tobytes())
            state.acc = int.from_bytes(h.digest()[:8], "little")
            out[i] = np.frombuffer(h.digest() * 6, np.uint8)[: 8 * 8 * 3].reshape(8, 8, 3)
            state.frame_index += 1
        return out

    def snapshot(self, state: SessionState) -> bytes:
        assert isinstance(state, RichState)
        return np.array([state.seed, state.frame_index, state.acc], np.uint64).tobytes()

    def restore(self, data: bytes) -> RichState:
        if len(data) != 24:
            raise SnapshotError("not a fake snapshot")
        seed, index, acc = (int(v) for v in np.frombuffer(data, np.uint64))
        state = RichState(seed)
        state.frame_index, state.acc = index, acc
        return state
