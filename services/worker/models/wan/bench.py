"""Streaming benchmark of a ``WanWorldModel``: first-frame latency and sustained fps."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from services.worker.models.base import Control
from services.worker.models.wan.adapter import WanWorldModel


@dataclass(frozen=True, slots=True)
class StreamResult:
    frames: int
    seconds: float
    fps: float  # frames after the first / time after the first (sustained)
    first_frame_s: float
    chunk_frames: int
    height: int
    width: int
    steps: int
    checksum: int  # sum of all pixels, to compare runs

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 4),
            "fps": round(self.fps, 3),
            "first_frame_s": round(self.first_frame_s, 4),
            "chunk_frames": self.chunk_frames,
            "height": self.height,
            "width": self.width,
            "steps": self.steps,
            "checksum": self.checksum,
        }


def _sync(model: WanWorldModel) -> None:
    if model.pipeline.device.type == "cuda":
        torch.cuda.synchronize(model.pipeline.device)


def stream(
    model: WanWorldModel, frames: int, steps: int | None = None, seed: int = 0
) -> StreamResult:
    """Step one session ``frames`` times; fps counts whole chunks after the first frame."""
    if frames < 2:
        raise ValueError("stream at least 2 frames")
    steps = steps or model.info.default_steps
    state = model.new_state(seed)
    control = Control()
    checksum = 0
    _sync(model)
    start = time.perf_counter()
    out = model.step([state], [control], steps)
    _sync(model)
    first = time.perf_counter() - start
    checksum += int(out.astype(np.int64).sum())
    for _ in range(frames - 1):
        out = model.step([state], [control], steps)
        checksum += int(out.astype(np.int64).sum())
    _sync(model)
    total = time.perf_counter() - start
    rest = max(total - first, 1e-9)
    return StreamResult(
        frames=frames,
        seconds=total,
        fps=(frames - 1) / rest,
        first_frame_s=first,
        chunk_frames=int(model.info.extra["rgb_frames_per_chunk"]),
        height=model.info.height,
        width=model.info.width,
        steps=steps,
        checksum=checksum,
    )
