"""One batch of a model: step, state captures, encoding; the same code wherever the model
runs.

The worker's engine runs it in its step thread for a model in the worker's process, and a
model host (``services.worker.model_host``) runs it in the model's own process.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.worker.models.base import Control, SessionState, WorldModel
from windflow.common import telemetry
from windflow.common.frames import encode_frame
from windflow.v1 import windflow_pb2 as pb


@dataclass(frozen=True, slots=True)
class Encoding:
    """How one session wants its frames: ``SessionSpec`` format, size and JPEG quality."""

    format: int
    width: int
    height: int
    jpeg_quality: int


class Capture(enum.IntFlag):
    """What a batch keeps of a session's state right after its step."""

    NONE = 0
    SNAPSHOT = 1
    """Snapshot bytes (a durable checkpoint, uploaded by the worker)."""
    COPY = 2
    """A copy of the state where the model runs (``WorldModel.copy``: the worker's
    in-memory snapshots, which forks and rewinds on this worker restore from)."""


@dataclass(slots=True)
class StepResult:
    frames: list[bytes]
    snapshots: list[bytes | None]
    copies: list[SessionState | None]
    model_start_us: int
    model_end_us: int
    encoded_us: list[int]
    model_ms: float
    encode_ms: list[float]


class RemoteBatches(abc.ABC):
    """A model that runs a whole batch (``step_and_encode``) where it lives, in one call."""

    @abc.abstractmethod
    def step_and_encode(
        self,
        states: Sequence[SessionState],
        controls: Sequence[Control],
        steps: int,
        encodings: Sequence[Encoding],
        captures: Sequence[Capture],
    ) -> StepResult: ...


def step_and_encode(
    model: WorldModel,
    states: Sequence[SessionState],
    controls: Sequence[Control],
    steps: int,
    encodings: Sequence[Encoding],
    captures: Sequence[Capture],
) -> StepResult:
    """Step ``states`` as one batch, capture what ``captures`` asks of each (after the
    step) and encode each frame as its session wants it; a model living elsewhere
    (``RemoteBatches``) does all of it where it lives."""
    if isinstance(model, RemoteBatches):
        return model.step_and_encode(states, controls, steps, encodings, captures)
    start_us = telemetry.now_us()
    t0 = time.perf_counter()
    rgb = model.step(states, controls, steps)
    t1 = time.perf_counter()
    end_us = telemetry.now_us()
    snapshots: list[bytes | None] = []
    copies: list[SessionState | None] = []
    for s, capture in zip(states, captures, strict=True):
        snapshots.append(model.snapshot(s) if capture & Capture.SNAPSHOT else None)
        copies.append(model.copy(s) if capture & Capture.COPY else None)
    frames: list[bytes] = []
    encoded_us: list[int] = []
    encode_ms: list[float] = []
    for i, enc in enumerate(encodings):
        e0 = time.perf_counter()
        frames.append(encode_frame(rgb[i], enc.format, enc.width, enc.height, enc.jpeg_quality))
        encode_ms.append((time.perf_counter() - e0) * 1000.0)
        encoded_us.append(telemetry.now_us())
    return StepResult(
        frames, snapshots, copies, start_us, end_us, encoded_us, (t1 - t0) * 1000.0, encode_ms
    )


def native_encoding(model: WorldModel) -> Encoding:
    """JPEG at quality 85 and the model's native size: what calibration times."""
    return Encoding(pb.FRAME_FORMAT_JPEG, model.info.width, model.info.height, 85)


def time_step(model: WorldModel, steps: int, batch: int, repeats: int) -> float:
    """Least wall time (ms) of ``repeats`` batched steps + JPEG encodings on fresh states,
    after one to warm up. The least, not the median: other processes (a whole stack
    starting on a small machine) only ever add time, and live steps refine the figure."""
    states = [model.new_state(i) for i in range(batch)]
    encodings = [native_encoding(model)] * batch
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        step_and_encode(
            model, states, [Control()] * batch, steps, encodings, [Capture.NONE] * batch
        )
        times.append((time.perf_counter() - t0) * 1000.0)
    return min(times[1:])
