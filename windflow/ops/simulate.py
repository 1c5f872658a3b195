"""A plan checked by simulation: the workload's peak replayed against the planned replicas
through the runtime's own pure cores, on a simulated clock (no process, no sleeping).

- **Arrivals**: each demand's peak as that many users; each opens a session (spread
  over the first ``ramp_s``), keeps it for an exponential time (mean ``mean_session_s``)
  and opens the next one at once, so the concurrency stays at the peak and sessions
  churn; a refused user retries after the retry-after hint (2 s).
- **Placement**: the router's core (``services.router.placement.choose_worker``) over the
  replicas of the demand, the highest-quality rung's first, each replica's view built as
  a worker publishes it (``admission.headroom``, its predicted utilization, its slots =
  the plan's sessions per replica); then the worker's own check
  (``admission.check``). A session nobody takes is a refusal.
- **Replicas**: each runs the worker's step loop as the engine does with a model host
  (one batch at a time, planned 2 ms ahead, started at its deadline):
  ``scheduler.plan`` (EDF batches, the horizon of the engine's ``_batch_horizon``),
  ``scheduler.next_due``, a ``StepCosts`` seeded from the profile and refined by every
  batch, and the ``QualityGovernor`` (``scheduler.decide_quality``: rungs down on misses,
  up on slack). A batch takes a time drawn from the profile's measured samples of that
  (steps, batch size), interpolated between measured sizes.
- **Counted**: a frame is on time when it is ready by its deadline plus one interval (the
  runtime's miss rule); frames a late session skipped (its clock restarts) count as missed.
  ``deadline_attainment`` = on time / (made + skipped).

Spot replicas are not evicted in the simulation (the plan derates them instead).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from services.router import placement
from services.worker import admission, scheduler
from services.worker.costs import StepCosts
from services.worker.models.base import ModelInfo
from services.worker.quality import QualityGovernor
from windflow.errors import NotFound, ResourceExhausted
from windflow.ops.planner import Plan, PlanLine
from windflow.ops.profile import Profile
from windflow.ops.workload import Demand
from windflow.v1 import windflow_pb2 as pb

if TYPE_CHECKING:
    from services.worker.actor import SessionActor
    from services.worker.engine import StepEngine
    from services.worker.models.base import WorldModel

LEAD_S = 0.002
"""The engine's lead with a model host: ``WAKE_LEAD_S`` + ``HOST_LEAD_S`` (engine.py)."""
HORIZON_S = 0.008
"""``WorkerConfig.batch_horizon_ms``."""
RETRY_AFTER_S = 2.0
"""``WorkerConfig.admission_retry_after_s``."""


@dataclass(slots=True)
class _Model:
    """What the governor reads of a model: its info (the step ladder)."""

    info: ModelInfo


@dataclass(slots=True)
class _Actor:
    """What the quality governor and admission read of a session actor."""

    session_id: str
    spec: pb.SessionSpec
    model: _Model
    interval: float
    steps: int
    due: float
    demand: str
    planned_steps: int
    next_frame: int = 0
    events: int = 0
    lockstep: bool = False
    """Interactive sessions only (paced by their fps, with deadlines)."""

    def push(self, message: pb.ServerMessage) -> None:
        self.events += 1  # a KIND_QUALITY_CHANGED event for the client


@dataclass(slots=True)
class _Engine:
    """What ``admission`` reads of a worker's step engine."""

    costs: StepCosts
    quality: QualityGovernor
    max_batch: dict[str, int]


class _Sampler:
    """Batch times (s) drawn from a profile's samples, for any batch size."""

    def __init__(self, profile: Profile, delta_ms: float, rng: random.Random) -> None:
        self._rng = rng
        self._profile = profile
        self._delta = delta_ms
        self._tables: dict[tuple[int, int], list[float]] = {}

    def _table(self, steps: int, batch: int) -> list[float]:
        key = (steps, batch)
        table = self._tables.get(key)
        if table is not None:
            return table
        measured = self._profile.batch_samples[steps]
        sizes = sorted(measured)
        grid = [i / 40 for i in range(41)]
        if batch in measured:
            points = [_q(measured[batch], u) for u in grid]
        else:
            lower = [b for b in sizes if b < batch]
            upper = [b for b in sizes if b > batch]
            if lower and upper:
                b0, b1 = lower[-1], upper[0]
            elif upper:
                b0, b1 = upper[0], upper[1] if len(upper) > 1 else upper[0]
            else:
                b0, b1 = (lower[-2], lower[-1]) if len(lower) > 1 else (lower[-1], lower[-1])
            points = []
            for u in grid:
                q0, q1 = _q(measured[b0], u), _q(measured[b1], u)
                slope = (q1 - q0) / (b1 - b0) if b1 != b0 else q0 / b0
                points.append(max(0.0, q0 + slope * (batch - b0)))
        table = [(p + batch * self._delta) / 1000.0 for p in points]
        self._tables[key] = table
        return table

    def draw(self, steps: int, batch: int) -> float:
        table = self._table(steps, batch)
        u = self._rng.random() * (len(table) - 1)
        i = int(u)
        j = min(i + 1, len(table) - 1)
        return table[i] + (table[j] - table[i]) * (u - i)


def _finite(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None


def _q(samples: Sequence[float], u: float) -> float:
    pos = u * (len(samples) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(samples) - 1)
    return samples[lo] + (samples[hi] - samples[lo]) * (pos - lo)


@dataclass(slots=True)
class _Worker:
    worker_id: str
    line: PlanLine
    capacity: int
    engine: _Engine
    info: ModelInfo
    model_pb: pb.ModelInfo
    sampler: _Sampler
    sessions: dict[str, _Actor] = field(default_factory=dict)
    busy: bool = False
    wake_version: int = 0

    @property
    def model_id(self) -> str:
        return self.line.option.demand.model

    def view(self, target: float) -> placement.WorkerView:
        models = {self.model_id: cast("WorldModel", _Model(self.info))}
        rooms = admission.headroom(cast("StepEngine", self.engine), models, target)
        return placement.WorkerView(
            self.worker_id,
            "",
            self.line.option.region,
            frozenset({self.model_id}),
            self.capacity,
            len(self.sessions),
            {(h.model_id, h.steps): h.fps for h in rooms},
            self.engine.quality.utilization(),
        )


@dataclass(slots=True)
class DemandStats:
    frames: int = 0
    on_time: int = 0
    skipped: int = 0
    within_target: int = 0
    below_plan: int = 0
    admitted: int = 0
    refused: int = 0
    latencies_ms: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SimResult:
    deadline_attainment: float
    latency_attainment: float
    refusals: int
    admitted: int
    frames: int
    skipped: int
    quality_changes: int
    below_plan_share: float
    latency_ms_p50: float
    latency_ms_p99: float
    simulated_s: float
    wall_ms: float
    per_demand: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "deadline_attainment": round(self.deadline_attainment, 5),
            "latency_attainment": round(self.latency_attainment, 5),
            "refusals": self.refusals,
            "admitted": self.admitted,
            "frames": self.frames,
            "skipped_frames": self.skipped,
            "quality_changes": self.quality_changes,
            "frames_below_planned_rung": round(self.below_plan_share, 5),
            "latency_ms_p50": _finite(self.latency_ms_p50),
            "latency_ms_p99": _finite(self.latency_ms_p99),
            "simulated_s": self.simulated_s,
            "wall_ms": round(self.wall_ms, 1),
            "per_demand": self.per_demand,
        }


def simulate(
    plan: Plan,
    demands: Sequence[Demand],
    profiles: Mapping[tuple[str, str], Profile],
    *,
    seconds: float = 20.0,
    seed: int = 1,
    ramp_s: float = 2.0,
    target_utilization: float = 0.9,
    peaks: Mapping[str, int] | None = None,
) -> SimResult:
    """Replay each demand's peak (or ``peaks``) against ``plan``; see the module doc."""
    t_wall = time.perf_counter()
    rng = random.Random(seed)
    params = scheduler.QualityParams()
    workers: list[_Worker] = []
    by_demand: dict[str, list[_Worker]] = {d.name: [] for d in demands}
    for line in plan.lines:
        option = line.option
        profile = profiles[(option.demand.model, option.worker_class.name)]
        d = option.demand
        info = ModelInfo(
            model_id=d.model,
            version=profile.model_version,
            description="",
            width=profile.width,
            height=profile.height,
            fps=profile.fps,
            actions=(),
            steps=profile.steps,
            default_steps=profile.default_steps,
            max_batch=profile.max_batch,
        )
        model_pb = pb.ModelInfo(model_id=d.model, steps=list(profile.steps))
        delta = profile.encode_delta_ms(d.format, d.width, d.height)
        for i in range(line.replicas):
            costs = profile.costs(d.format, d.width, d.height)
            max_batch = {d.model: profile.max_batch}
            governor = QualityGovernor(costs, max_batch, params)
            name = (
                f"{option.worker_class.name}{'-spot' if line.spot else ''}-{option.region}-"
                f"{d.name}-s{option.steps}-{i}"
            )
            worker = _Worker(
                name,
                line,
                option.sessions,
                _Engine(costs, governor, max_batch),
                info,
                model_pb,
                _Sampler(profile, delta, random.Random(rng.random())),
            )
            workers.append(worker)
            by_demand.setdefault(d.name, []).append(worker)
    for group in by_demand.values():
        group.sort(key=lambda w: (w.line.option.rung, w.worker_id))

    stats = {d.name: DemandStats() for d in demands}
    demand_of = {d.name: d for d in demands}
    heap: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()

    def push(at: float, kind: str, payload: Any) -> None:
        heapq.heappush(heap, (at, next(seq), kind, payload))

    for d in demands:
        n = (peaks or {}).get(d.name, d.peak_sessions)
        for u in range(n):
            push(rng.uniform(0.0, ramp_s), "arrive", (d, u))

    ids = itertools.count()

    def poll(w: _Worker, now: float) -> None:
        if w.busy or not w.sessions:
            return
        slots = [
            scheduler.Slot(a.session_id, w.model_id, a.steps, a.due, True)
            for a in w.sessions.values()
        ]
        urgent = min(slots, key=lambda s: s.due)
        size = w.engine.max_batch[w.model_id]
        predicted = w.engine.costs.batch_ms(w.model_id, urgent.steps, size) or 0.0
        horizon = max(HORIZON_S, predicted / 1000.0)
        batches = scheduler.plan(slots, now + LEAD_S, horizon=horizon, max_batch=w.engine.max_batch)
        if not batches:
            w.wake_version += 1
            wake = (scheduler.next_wakeup(slots) or now) - LEAD_S
            push(max(now, wake), "wake", (w, w.wake_version))
            return
        batch = batches[0]
        actors = [w.sessions[s] for s in batch.session_ids]
        start = max(now, min(a.due for a in actors))
        took = w.sampler.draw(batch.steps, len(actors))
        dues = [a.due for a in actors]
        for a in actors:
            a.due += a.interval  # the next frame's, until the batch completes (the engine)
        w.busy = True
        push(start + took, "done", (w, actors, dues, batch.steps, took))

    def done(
        finished: float,
        w: _Worker,
        actors: list[_Actor],
        dues: list[float],
        steps: int,
        took: float,
    ) -> None:
        w.busy = False
        w.engine.costs.observe(w.model_id, steps, len(actors), took * 1000.0)
        present = [a for a in actors if a.session_id in w.sessions]
        present_dues = [dues[i] for i, a in enumerate(actors) if a.session_id in w.sessions]
        for a, due in zip(present, present_dues, strict=True):
            s = stats[a.demand]
            latency = finished - due
            s.frames += 1
            s.latencies_ms.append(latency * 1000.0)
            if finished <= due + a.interval:
                s.on_time += 1
            if latency * 1000.0 <= demand_of[a.demand].latency_ms:
                s.within_target += 1
            if a.steps < a.planned_steps:
                s.below_plan += 1
            nxt = scheduler.next_due(due, a.interval, finished)
            if nxt == finished and finished - (due + a.interval) > a.interval:
                s.skipped += int((finished - (due + a.interval)) / a.interval)
            a.due = nxt
            a.next_frame += 1
        governor = w.engine.quality
        governor.after_step(cast("list[SessionActor]", present), present_dues, finished)
        poll(w, finished)

    def arrive(now: float, d: Demand, user: int) -> None:
        s = stats[d.name]
        for rung_group in _by_rung(by_demand.get(d.name, [])):
            steps = rung_group[0].line.option.steps
            spec = pb.SessionSpec(
                model_id=d.model,
                fps=d.fps,
                steps=steps,
                region=d.region,
                quality=pb.QualityPolicy(
                    mode=pb.QualityPolicy.MODE_ADAPTIVE, min_steps=d.min_steps, min_fps=d.fps
                ),
            )
            want = placement.Demand(d.model, d.fps, steps, d.min_steps, True)
            views = [w.view(target_utilization) for w in rung_group]
            try:
                chosen = placement.choose_worker(views, d.model, d.region, demand=want)
            except (ResourceExhausted, NotFound):
                continue
            worker = next(w for w in rung_group if w.worker_id == chosen.worker_id)
            try:
                admission.check(
                    cast("StepEngine", worker.engine),
                    spec,
                    worker.model_pb,
                    target_utilization,
                    RETRY_AFTER_S,
                    worker.worker_id,
                )
            except ResourceExhausted:
                continue
            sid = f"s{next(ids)}"
            actor = _Actor(sid, spec, _Model(worker.info), 1.0 / d.fps, steps, now, d.name, steps)
            worker.sessions[sid] = actor
            worker.engine.quality.add(cast("SessionActor", actor))
            s.admitted += 1
            push(now + rng.expovariate(1.0 / d.mean_session_s), "leave", (worker, sid, d, user))
            poll(worker, now)
            return
        s.refused += 1
        push(now + RETRY_AFTER_S, "arrive", (d, user))

    now = 0.0
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if now > seconds:
            break
        if kind == "arrive":
            arrive(now, *payload)
        elif kind == "done":
            done(now, *payload)
        elif kind == "wake":
            w, version = payload
            if version == w.wake_version:
                poll(w, now)
        elif kind == "leave":
            w, sid, d, user = payload
            w.sessions.pop(sid, None)
            w.engine.quality.remove(sid)
            arrive(now, d, user)

    total = DemandStats()
    per: dict[str, dict[str, Any]] = {}
    for name, s in stats.items():
        due = s.frames + s.skipped
        per[name] = {
            "deadline_attainment": round(s.on_time / due, 5) if due else None,
            "admitted": s.admitted,
            "refusals": s.refused,
            "frames": s.frames,
        }
        total.frames += s.frames
        total.on_time += s.on_time
        total.skipped += s.skipped
        total.within_target += s.within_target
        total.below_plan += s.below_plan
        total.admitted += s.admitted
        total.refused += s.refused
        total.latencies_ms.extend(s.latencies_ms)
    due_all = total.frames + total.skipped
    lat = sorted(total.latencies_ms)
    return SimResult(
        deadline_attainment=total.on_time / due_all if due_all else 1.0,
        latency_attainment=total.within_target / total.frames if total.frames else 1.0,
        refusals=total.refused,
        admitted=total.admitted,
        frames=total.frames,
        skipped=total.skipped,
        quality_changes=sum(w.engine.quality.quality_changes for w in workers),
        below_plan_share=total.below_plan / total.frames if total.frames else 0.0,
        latency_ms_p50=statistics.median(lat) if lat else math.nan,
        latency_ms_p99=lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else math.nan,
        simulated_s=seconds,
        wall_ms=(time.perf_counter() - t_wall) * 1000.0,
        per_demand=per,
    )


def _by_rung(workers: list[_Worker]) -> list[list[_Worker]]:
    """The replicas grouped by rung, the highest quality first."""
    groups: dict[int, list[_Worker]] = {}
    for w in workers:
        groups.setdefault(w.line.option.rung, []).append(w)
    return [groups[k] for k in sorted(groups)]
