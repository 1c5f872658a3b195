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
class InputFrame:
    """A frame in (video-to-video), decoded: uint8 RGB shaped (height, width, 3).

    ``digest`` (sha256 hex of the bytes as sent) names it: controls compare by it, and the
    control log keeps it instead of the pixels (the bytes live in the object store)."""

    rgb: np.ndarray = field(compare=False, repr=False)
    digest: str


@dataclass(frozen=True, slots=True)
class Control:
    """The controls in effect for one frame.

    ``action`` indexes ``ModelInfo.actions``; ``axes`` (if the model declares any) are in
    [-1, 1], one per name in ``ModelInfo.axes``. The richer kinds are None where the model
    takes none or none was ever sent: ``prompt`` (text, ``ModelInfo.prompt``), ``pose``
    (one value per ``ModelInfo.pose`` component) and ``frame`` (``ModelInfo.input_frame``).
    A session's prompt, pose and input frame stay in effect until a later control changes
    them (the runtime merges); a model sees, for each frame, everything in effect.
    """

    action: int = 0
    axes: tuple[float, ...] = ()
    prompt: str | None = None
    pose: tuple[float, ...] | None = None
    frame: InputFrame | None = None


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """The model takes a text prompt of at most ``max_chars`` characters; ``default`` is
    the prompt in effect before a session's first one."""

    max_chars: int
    default: str = ""


POSE_ABSOLUTE = "absolute"
"""A pose is where the camera is (held until the next)."""
POSE_VELOCITY = "velocity"
"""A pose is the camera's change per frame (held until the next: a held motion)."""


@dataclass(frozen=True, slots=True)
class PoseSpec:
    """The model takes a camera pose: one float per component, each within its range."""

    kind: str  # POSE_ABSOLUTE or POSE_VELOCITY
    components: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class InputFrameSpec:
    """The model takes frames in: ``width`` x ``height`` RGB, sent as raw RGB or JPEG, at
    most ``fps`` of them used per second (one per frame made). At most ``queue`` wait per
    session; past it the oldest waiting one is dropped and counted (newest wins)."""

    width: int
    height: int
    fps: float
    queue: int = 2


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
    prompt: PromptSpec | None = None
    pose: PoseSpec | None = None
    input_frame: InputFrameSpec | None = None


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
        validate_rich(self.info, control)


def validate_rich(info: ModelInfo, control: Control) -> None:
    """The prompt, pose and input frame of ``control`` against what ``info`` declares;
    ``InvalidControl`` names the field."""
    model = repr(info.model_id)
    if control.prompt is not None:
        if info.prompt is None:
            raise InvalidControl(f"control.prompt: model {model} takes no prompt")
        if len(control.prompt) > info.prompt.max_chars:
            raise InvalidControl(
                f"control.prompt: {len(control.prompt)} characters, over the "
                f"{info.prompt.max_chars} model {model} takes"
            )
    if control.pose is not None:
        spec = info.pose
        if spec is None:
            raise InvalidControl(f"control.pose: model {model} takes no camera pose")
        if len(control.pose) != len(spec.components):
            raise InvalidControl(
                f"control.pose: model {model} takes {len(spec.components)} values "
                f"({', '.join(spec.components)}), got {len(control.pose)}"
            )
        for name, value, low, high in zip(
            spec.components, control.pose, spec.low, spec.high, strict=True
        ):
            if not low <= value <= high:  # NaN fails both
                raise InvalidControl(f"control.pose.{name} = {value} is outside [{low}, {high}]")
    if control.frame is not None:
        fspec = info.input_frame
        if fspec is None:
            raise InvalidControl(f"control.frame: model {model} takes no input frames")
        shape = control.frame.rgb.shape
        if shape != (fspec.height, fspec.width, 3) or control.frame.rgb.dtype != np.uint8:
            raise InvalidControl(
                f"control.frame: {describe_shape(shape)} {control.frame.rgb.dtype}, model "
                f"{model} takes {fspec.width}x{fspec.height} RGB uint8"
            )


def describe_shape(shape: tuple[int, ...]) -> str:
    """(H, W, 3) as 'WxH RGB'; anything else as it is."""
    if len(shape) == 3 and shape[2] == 3:
        return f"{shape[1]}x{shape[0]} RGB"
    return f"shape {shape}"
