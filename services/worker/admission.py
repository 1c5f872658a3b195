"""The worker's side of fps-aware admission (docs/runtime.md).

A session is admitted where every session, itself included, can be served at its quality
floor's step count and its full fps with the predicted step-thread utilization at or
below the target. The worker publishes its headroom per (model, steps) in ``WorkerInfo``;
the router places by it, and the worker re-checks at ``OpenSession`` (the router's table
may be a moment stale). Output-fps rungs below the asked fps are for overload, not
admission.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from services.worker.costs import Demand
from services.worker.models.base import WorldModel
from services.worker.quality import ladder_for
from windflow.errors import ResourceExhausted
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

if TYPE_CHECKING:
    from services.worker.engine import StepEngine


def floor_steps(spec: pb.SessionSpec, model: pb.ModelInfo) -> int:
    return min(level.steps for level in ladder_for(spec, list(model.steps)))


def headroom(
    engine: StepEngine, models: Mapping[str, WorldModel], target: float
) -> list[internal_pb2.Headroom]:
    demands = engine.quality.demands(floor=True)
    out = []
    for model_id, model in models.items():
        for steps in model.info.steps:
            room = engine.costs.fps_headroom(demands, model_id, steps, target, engine.max_batch)
            if room is not None:
                out.append(
                    internal_pb2.Headroom(
                        model_id=model_id, steps=steps, fps=room[0], frame_ms=room[1]
                    )
                )
    return out


def check(
    engine: StepEngine,
    spec: pb.SessionSpec,
    model: pb.ModelInfo,
    target: float,
    retry_after_s: float,
    worker_id: str,
) -> None:
    """Raise ResourceExhausted (with a retry-after hint) if ``spec`` does not fit. A
    lockstep session reserves no fps (it takes the step time interactive sessions leave):
    only its session slot counts."""
    if spec.session_class == pb.SESSION_CLASS_LOCKSTEP:
        return
    steps = floor_steps(spec, model)
    demands = engine.quality.demands(floor=True)
    room = engine.costs.fps_headroom(demands, spec.model_id, steps, target, engine.max_batch)
    if room is None:
        return  # never measured: admission by session slots only
    if spec.fps > room[0] + 1e-6:
        raise ResourceExhausted(
            f"worker {worker_id} cannot meet {spec.fps:g} fps for model {spec.model_id!r} at "
            f"{steps} steps: {room[0]:.1f} fps of headroom left "
            f"(target utilization {target:.0%})",
            retry_after_s=retry_after_s,
        )


__all__ = ["Demand", "check", "floor_steps", "headroom"]
