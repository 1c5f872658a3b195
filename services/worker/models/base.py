"""The contract between the worker and every model it serves.

Lifecycle of a model object::

    model = SomeModel.load(...)        # weights in memory, ready to step
    state = model.new_state(seed)      # one per session; lives on the worker between frames
    frames = model.step([s1, s2, ...], [c1, c2, ...], steps=k)   # batched, advances each state
    blob = model.snapshot(state)       # bytes, self-describing and versioned
    state = model.restore(blob)        # in this or a fresh instance of the same model version

Determinism is part of the contract: the same model version, seed and sequence of controls
give bit-identical frames, whether a state is stepped alone or batched with others, and
whether or not it went through snapshot/restore in between. The runtime's fork, rewind,
replay and crash recovery are built on it.

``step`` is called off the asyncio event loop (the worker's step thread) and may block.
Models validate controls themselves (``validate_control``) and raise the typed errors of
``windflow.errors``: ``InvalidControl`` for a bad control, ``SnapshotError`` for bytes that
are not a valid snapshot, ``SnapshotVersionMismatch`` for a snapshot of another model.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from windflow.errors import InvalidControl


@dataclass(frozen=True, slots=True)
class Control:
    """One control for one frame: a discrete action and optional continuous axes.

    ``action`` indexes ``ModelInfo.actions``; ``axes`` (if the model declares any) are in
    [-1, 1], one per name in ``ModelInfo.axes``.
    """

    action: int = 0
    axes: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a model declares about itself; published by workers and listed by ListModels."""

    model_id: str
    version: str
    description: str
    width: int
    height: int
    fps: float
    actions: tuple[str, ...]
    axes: tuple[str, ...] = ()
    steps: tuple[int, ...] = (1, 2, 3, 4)  # the quality ladder: allowed denoising step counts
    default_steps: int = 2
    max_batch: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


class SessionState(abc.ABC):
    """Opaque per-session model state. ``frame_index`` counts frames produced so far."""

    frame_index: int
    seed: int


class WorldModel(abc.ABC):
    """A batched, stateful, action-conditioned frame generator."""

    info: ModelInfo

    @abc.abstractmethod
    def new_state(self, seed: int) -> SessionState:
        """A fresh session state at frame 0, deterministic from ``seed``."""

    @abc.abstractmethod
    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        """Advance every state by one frame under its control.

        Returns uint8 RGB frames shaped (B, height, width, 3), row i for ``states[i]``.
        Raises ``InvalidControl`` before touching any state if a control is invalid, and
        ``InvalidArgument`` if ``steps`` is not on the ladder.
        """

    @abc.abstractmethod
    def snapshot(self, state: SessionState) -> bytes:
        """The whole session state as self-describing, versioned bytes."""

    @abc.abstractmethod
    def restore(self, data: bytes) -> SessionState:
        """Inverse of ``snapshot``; raises ``SnapshotError``/``SnapshotVersionMismatch``."""

    def copy(self, state: SessionState) -> SessionState:
        """An independent copy of ``state``: stepping either leaves the other as it was,
        and both go on to make the same frames. Kept where the model runs, never
        serialized (a worker's in-memory snapshots). The default goes through
        ``snapshot``/``restore``; a model overrides it with a cheaper copy."""
        return self.restore(self.snapshot(state))

    def validate_control(self, control: Control) -> None:
        """Raise ``InvalidControl`` with a clear message if ``control`` is not valid here."""
        n = len(self.info.actions)
        if not 0 <= control.action < n:
            raise InvalidControl(
                f"action {control.action} is outside the action space of model "
                f"{self.info.model_id!r} (0..{n - 1}: {', '.join(self.info.actions)})"
            )
        if len(control.axes) not in (0, len(self.info.axes)):
            raise InvalidControl(
                f"model {self.info.model_id!r} takes {len(self.info.axes)} axes "
                f"({', '.join(self.info.axes) or 'none'}), got {len(control.axes)}"
            )
        for name, value in zip(self.info.axes, control.axes, strict=False):
            if not (-1.0 <= value <= 1.0) or value != value:
                raise InvalidControl(f"axis {name!r} = {value} is outside [-1, 1]")
