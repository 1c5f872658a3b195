"""The step thread's cost model: a pure core for adaptive quality and fps-aware admission.

The step thread's time per batch (model step + encoding) is measured by model, step count
and batch size (a moving average; the worker calibrates each model at start, then every
live step refines it, and while it has no session it re-times one reference batch now and
then and rescales the model's figures by what it finds: a calibration taken while the
machine was busy does not keep an idle worker refusing sessions). From it:

- ``frame_ms``: the cost of one frame in a batch of ``n``;
- ``utilization``: the predicted busy fraction of the step thread for a set of sessions,
  each a ``Demand`` (model, steps, fps). Sessions of one model at one step count are
  assumed to share batches (up to the max batch), so a batch's fixed cost is amortized;
- ``fps_headroom``: how many more frames per second of (model, steps) fit under a target
  utilization. The router admits a session where its fps fits (docs/runtime.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Demand:
    model_id: str
    steps: int
    fps: float


class StepCosts:
    """Measured batch costs in milliseconds, by (model, steps, batch size)."""

    def __init__(self, *, alpha: float = 0.1) -> None:
        self._alpha = alpha
        self._ms: dict[tuple[str, int], dict[int, float]] = {}

    def observe(self, model_id: str, steps: int, batch: int, ms: float) -> None:
        points = self._ms.setdefault((model_id, steps), {})
        old = points.get(batch)
        points[batch] = ms if old is None else old + self._alpha * (ms - old)

    def rescale(self, model_id: str, factor: float) -> None:
        """Scale every cost measured for ``model_id`` by ``factor`` (the model got that
        much faster or slower here, as a re-timed reference batch says)."""
        if factor <= 0:
            raise ValueError(f"a cost factor must be > 0, got {factor}")
        for (m, _), points in self._ms.items():
            if m == model_id:
                for batch in points:
                    points[batch] *= factor

    def known(self, model_id: str) -> bool:
        return any(m == model_id for m, _ in self._ms)

    def batch_ms(self, model_id: str, steps: int, batch: int) -> float | None:
        """Predicted cost of one batch; None when nothing was measured for the model."""
        points = self._ms.get((model_id, steps))
        if not points:
            # scale from the nearest measured step count (cost ~ proportional to steps)
            others = [k for m, k in self._ms if m == model_id]
            if not others:
                return None
            nearest = min(others, key=lambda k: (abs(k - steps), k))
            base = self.batch_ms(model_id, nearest, batch)
            return None if base is None else base * steps / nearest
        if batch in points:
            return points[batch]
        sizes = sorted(points)
        if len(sizes) == 1:
            return points[sizes[0]] * batch / sizes[0]  # no batching gain assumed
        lower = [b for b in sizes if b < batch]
        upper = [b for b in sizes if b > batch]
        if lower and upper:
            b0, b1 = lower[-1], upper[0]
        elif upper:
            b0, b1 = upper[0], upper[1]
        else:
            b0, b1 = lower[-2], lower[-1]
        slope = (points[b1] - points[b0]) / (b1 - b0)
        return max(0.0, points[b0] + slope * (batch - b0))

    def frame_ms(self, model_id: str, steps: int, batch: int) -> float | None:
        total = self.batch_ms(model_id, steps, max(1, batch))
        return None if total is None else total / max(1, batch)

    def utilization(self, demands: Iterable[Demand], max_batch: Mapping[str, int]) -> float | None:
        """Predicted busy fraction of the step thread; None if a model was never measured."""
        groups: dict[tuple[str, int], list[float]] = {}
        for d in demands:
            groups.setdefault((d.model_id, d.steps), []).append(d.fps)
        total = 0.0
        for (model_id, steps), rates in groups.items():
            n = min(len(rates), max(1, max_batch.get(model_id, 1)))
            per_frame = self.frame_ms(model_id, steps, n)
            if per_frame is None:
                return None
            total += sum(rates) * per_frame / 1000.0
        return total

    def fps_headroom(
        self,
        demands: Iterable[Demand],
        model_id: str,
        steps: int,
        target: float,
        max_batch: Mapping[str, int],
    ) -> tuple[float, float] | None:
        """(fps, frame_ms): the most fps a new session of (model, steps) may ask for with
        the predicted utilization staying at or below ``target``, and its frame cost."""
        demands = list(demands)
        same = [d for d in demands if (d.model_id, d.steps) == (model_id, steps)]
        others = [d for d in demands if (d.model_id, d.steps) != (model_id, steps)]
        base = self.utilization(others, max_batch)
        n = min(len(same) + 1, max(1, max_batch.get(model_id, 1)))
        per_frame = self.frame_ms(model_id, steps, n)
        if base is None or per_frame is None or per_frame <= 0:
            return None
        room = (target - base) * 1000.0 / per_frame - sum(d.fps for d in same)
        return max(0.0, room), per_frame
