"""Adaptive quality on a worker: runs the scheduler's pure decisions over the live
session actors.

The step engine calls ``add``/``remove`` as sessions come and go, ``after_step`` after
every batch (it records each frame's deadline outcome, decides rung changes with
``scheduler.decide_quality`` and applies them: the actor's steps and frame interval
change, and the client gets a ``KIND_QUALITY_CHANGED`` event). No I/O here; it runs on
the event loop. A session's deadline grid is never moved by its controls: that would
deliver more frames than its fps (a frame whose control is waiting may only start a
little early, ``scheduler.start_due``).

A frame's deadline is its due time plus one frame interval (it must be ready before the
next one is due); a frame ready within ``slack_fraction`` of an interval of its due time
had slack.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.worker import scheduler
from services.worker.actor import SessionActor
from services.worker.costs import Demand, StepCosts
from services.worker.scheduler import Level, QualityParams
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Track:
    levels: tuple[Level, ...]
    window: int
    level: int = 0
    recent: collections.deque[bool] = field(default_factory=collections.deque)
    slack_streak: int = 0
    changed_at: float = scheduler.NEVER
    misses: int = 0


def ladder_for(spec: pb.SessionSpec, ladder_steps: Sequence[int]) -> tuple[Level, ...]:
    policy = spec.quality
    return scheduler.quality_ladder(
        ladder_steps,
        spec.steps,
        spec.fps,
        adaptive=policy.mode != pb.QualityPolicy.MODE_FIXED,
        min_steps=policy.min_steps,
        min_fps=policy.min_fps,
    )


class QualityGovernor:
    def __init__(
        self,
        costs: StepCosts,
        max_batch: Mapping[str, int],
        params: QualityParams | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.costs = costs
        self.params = params or QualityParams()
        self._max_batch = dict(max_batch)
        self._on_change = on_change
        self._tracks: dict[str, _Track] = {}
        self._actors: dict[str, SessionActor] = {}
        self.deadline_misses = 0
        self.quality_changes = 0
        self.misses_by_model: collections.Counter[str] = collections.Counter()
        self.changes_by_direction: collections.Counter[str] = collections.Counter()
        """Rung changes by direction, "down" and "up" (the metrics)."""

    def add(self, actor: SessionActor) -> None:
        levels = ladder_for(actor.spec, actor.model.info.steps)
        self._tracks[actor.session_id] = _Track(levels, self.params.window)
        self._actors[actor.session_id] = actor

    def remove(self, session_id: str) -> None:
        self._tracks.pop(session_id, None)
        self._actors.pop(session_id, None)

    def level(self, session_id: str) -> tuple[int, Level]:
        track = self._tracks[session_id]
        return track.level, track.levels[track.level]

    def misses(self, session_id: str) -> int:
        track = self._tracks.get(session_id)
        return track.misses if track else 0

    # ---- load ----

    def demands(self, *, floor: bool = False) -> list[Demand]:
        """Each session's demand at its current rung, or at its floor steps and asked fps."""
        out = []
        for sid, track in self._tracks.items():
            if self._actors[sid].lockstep:
                continue  # (it takes what the interactive sessions leave: no reservation)
            model_id = self._actors[sid].spec.model_id
            if floor:
                asked = track.levels[0]
                out.append(Demand(model_id, min(lv.steps for lv in track.levels), asked.fps))
            else:
                lv = track.levels[track.level]
                out.append(Demand(model_id, lv.steps, lv.fps))
        return out

    def utilization(self, *, floor: bool = False) -> float | None:
        return self.costs.utilization(self.demands(floor=floor), self._max_batch)

    # ---- hooks from the step engine ----

    def after_step(
        self, actors: Sequence[SessionActor], dues: Sequence[float], finished: float
    ) -> None:
        for actor, due in zip(actors, dues, strict=True):
            track = self._tracks.get(actor.session_id)
            if track is None or actor.lockstep:
                continue  # (a lockstep frame has no deadline)
            late = finished > due + actor.interval
            track.recent.append(late)
            while len(track.recent) > track.window:
                track.recent.popleft()
            if late:
                track.misses += 1
                self.deadline_misses += 1
                self.misses_by_model[actor.spec.model_id] += 1
            slack = finished <= due + self.params.slack_fraction * actor.interval
            track.slack_streak = track.slack_streak + 1 if slack else 0
        self._decide(finished)

    def _decide(self, now: float) -> None:
        if not any(len(t.levels) > 1 for t in self._tracks.values()):
            return
        utilization = self.utilization()
        views = []
        for sid, track in self._tracks.items():
            if len(track.levels) < 2:
                continue
            model_id = self._actors[sid].spec.model_id
            costs = tuple(self._share(model_id, lv) for lv in track.levels)
            views.append(
                scheduler.QualityView(
                    sid, track.level, costs, sum(track.recent), track.slack_streak, track.changed_at
                )
            )
        changes = scheduler.decide_quality(
            views, now, math.inf if utilization is None else utilization, self.params
        )
        for change in changes:
            self._apply(change, now)
        if changes:
            self._on_change()

    def _share(self, model_id: str, level: Level) -> float:
        frame = self.costs.frame_ms(model_id, level.steps, self._max_batch.get(model_id, 1))
        return 0.0 if frame is None else level.fps * frame / 1000.0

    def _apply(self, change: scheduler.QualityChange, now: float) -> None:
        track = self._tracks[change.session_id]
        actor = self._actors[change.session_id]
        before = track.levels[track.level]
        track.level = change.level
        track.changed_at = now
        track.recent.clear()
        track.slack_streak = 0
        level = track.levels[change.level]
        actor.steps = level.steps
        actor.interval = 1.0 / level.fps
        self.quality_changes += 1
        direction = "down" if change.reason == "deadline" else "up"
        self.changes_by_direction[direction] += 1
        message = (
            f"quality {direction} ({change.reason}): {before.steps} -> {level.steps} steps, "
            f"{before.fps:g} -> {level.fps:g} fps"
        )
        log.info(
            "session %s %s", change.session_id, message, extra={"session_id": actor.session_id}
        )
        actor.push(
            pb.ServerMessage(
                event=pb.SessionEvent(
                    kind=pb.SessionEvent.KIND_QUALITY_CHANGED,
                    message=message,
                    frame_index=actor.next_frame,
                    steps=level.steps,
                    fps=level.fps,
                    level=change.level,
                )
            )
        )
