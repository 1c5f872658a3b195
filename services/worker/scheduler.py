"""The worker's step scheduler: a pure core, plain data in, decisions out.

Earliest-deadline-first over the sessions' next frame deadlines; sessions of one model at
one step count that are due within ``horizon`` of the earliest deadline share one batched
model step, up to the model's max batch and its memory budget (``effective_max_batch``).

Lockstep sessions (simulation: no clock, a frame as soon as its control is in) are a
throughput class below the interactive ones: they fill the room left in the interactive
batches of their model and step count, as long as that makes the batch at most
``FILL_SLACK`` slower than it would be without them; and they get batches of their own only
while no interactive frame is due, and only those predicted to end before the next
interactive deadline. So they take what the interactive sessions leave and never make one
late. Among themselves, the one that waited longest goes first (its ``due`` is when it
became ready).

Adaptive quality (``quality_ladder``, ``decide_quality``): each session has a ladder of
(steps, fps) rungs; rung 0 is what it asked for, each next rung has fewer denoising steps,
then a lower output fps. Sessions that miss deadlines step down; a session climbs back one
rung only after a long run of frames with slack, when the predicted utilization after the
climb stays under a lower threshold, and never within a cooldown of its last change: the
thresholds differ (hysteresis), so quality does not flap. See docs/runtime.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slot:
    """What the scheduler needs to know about one session."""

    session_id: str
    model_id: str
    steps: int
    due: float
    """Deadline of its next frame (monotonic seconds)."""
    ready: bool
    """Attached and allowed to produce (its output policy does not hold it back)."""
    lockstep: bool = False
    """A lockstep session: ``due`` is when its next frame's control arrived, not a
    deadline."""
    expecting: bool = False
    """(Lockstep, not ready) idle until its next control comes: a batch being gathered
    waits a moment for it."""


FILL_SLACK = 0.25
"""How much slower (as a share) lockstep sessions may make an interactive batch they join."""
LOCKSTEP_GATHER_S = 0.005
"""How long a lockstep batch short of the max waits, from its oldest control's arrival, for
the controls of the other lockstep sessions of its model that are expecting one: a vector
of environments sends its N controls together, and one batch of N costs far less than
several smaller ones. (A session alone, or whose peers are all ready, waits for nothing.)"""

CostFn = Callable[[str, int, int], float | None]
"""Predicted seconds of a batch of (model, steps, size); None when unknown."""


@dataclass(frozen=True, slots=True)
class Batch:
    model_id: str
    steps: int
    session_ids: tuple[str, ...]
    due: float
    """The earliest deadline in the batch."""


def plan(
    slots: Iterable[Slot],
    now: float,
    *,
    horizon: float,
    max_batch: Mapping[str, int],
    cost_s: CostFn | None = None,
) -> list[Batch]:
    """Batches to step now, most urgent first. Empty when nothing is due by ``now``.
    ``cost_s`` predicts a batch's time (lockstep sessions are placed by it; without it they
    fill interactive batches to the max and go alone only while no interactive session is
    ready)."""
    slots = list(slots)
    ready = sorted((s for s in slots if s.ready), key=lambda s: (s.due, s.session_id))
    interactive = [s for s in ready if not s.lockstep]
    lockstep = [s for s in ready if s.lockstep]
    expecting = {(s.model_id, s.steps) for s in slots if s.expecting and not s.ready}
    batches: list[Batch] = []
    if interactive and interactive[0].due <= now:
        cutoff = max(now, interactive[0].due) + horizon
        groups: dict[tuple[str, int], list[Slot]] = {}
        for slot in interactive:
            if slot.due > cutoff:
                break
            groups.setdefault((slot.model_id, slot.steps), []).append(slot)
        for (model_id, steps), members in groups.items():
            size = max(1, max_batch.get(model_id, 1))
            for i in range(0, len(members), size):
                chunk = members[i : i + size]
                ids = tuple(s.session_id for s in chunk)
                batches.append(Batch(model_id, steps, ids, chunk[0].due))
        batches = _fill(batches, lockstep, max_batch, cost_s)
    elif lockstep:
        later = interactive[0].due if interactive else math.inf
        batches = _lockstep_alone(lockstep, now, later, max_batch, cost_s, expecting)
    batches.sort(key=lambda b: (b.due, b.session_ids))
    return batches


def _fill(
    batches: list[Batch], lockstep: list[Slot], max_batch: Mapping[str, int], cost_s: CostFn | None
) -> list[Batch]:
    """Lockstep sessions join the interactive batches of their model and step count where
    there is room, each batch at most ``FILL_SLACK`` slower for it."""
    waiting: dict[tuple[str, int], list[Slot]] = {}
    for slot in lockstep:
        waiting.setdefault((slot.model_id, slot.steps), []).append(slot)
    out = []
    for batch in batches:
        queue = waiting.get((batch.model_id, batch.steps))
        ids = list(batch.session_ids)
        size = max(1, max_batch.get(batch.model_id, 1))
        base = cost_s(batch.model_id, batch.steps, len(ids)) if cost_s else None
        while queue and len(ids) < size:
            if base is not None and cost_s is not None:
                grown = cost_s(batch.model_id, batch.steps, len(ids) + 1)
                if grown is None or grown > base * (1.0 + FILL_SLACK):
                    break
            ids.append(queue.pop(0).session_id)
        out.append(Batch(batch.model_id, batch.steps, tuple(ids), batch.due))
    return out


def _lockstep_alone(
    lockstep: list[Slot],
    now: float,
    next_deadline: float,
    max_batch: Mapping[str, int],
    cost_s: CostFn | None,
    expecting: Collection[tuple[str, int]] = (),
) -> list[Batch]:
    """Batches of lockstep sessions alone, one after the other from ``now``: the largest
    each that is predicted to end by ``next_deadline`` (the earliest interactive frame's).
    A group short of a full batch, with peers ``expecting`` a control, waits for them
    while its oldest control arrived less than ``LOCKSTEP_GATHER_S`` ago."""
    groups: dict[tuple[str, int], list[Slot]] = {}
    for slot in lockstep:
        groups.setdefault((slot.model_id, slot.steps), []).append(slot)
    out: list[Batch] = []
    at = now
    for (model_id, steps), members in groups.items():
        size = max(1, max_batch.get(model_id, 1))
        if (
            len(members) < size
            and (model_id, steps) in expecting
            and now < members[0].due + LOCKSTEP_GATHER_S
        ):
            continue  # more are on their way (``next_wakeup`` comes back for them)
        while members:
            n = min(size, len(members))
            if next_deadline < math.inf:
                n = _fits(model_id, steps, n, next_deadline - at, cost_s)
                if n == 0:
                    return out
                took = cost_s(model_id, steps, n) if cost_s else None
                at += took or 0.0
            chunk, members = members[:n], members[n:]
            out.append(Batch(model_id, steps, tuple(s.session_id for s in chunk), chunk[0].due))
    return out


def _fits(model_id: str, steps: int, most: int, left_s: float, cost_s: CostFn | None) -> int:
    """The most sessions (up to ``most``) whose batch is predicted to take at most
    ``left_s``; 0 when none, or when nothing predicts it."""
    if cost_s is None:
        return 0
    for n in range(most, 0, -1):
        took = cost_s(model_id, steps, n)
        if took is not None and took <= left_s:
            return n
    return 0


def next_wakeup(slots: Iterable[Slot], now: float | None = None) -> float | None:
    """The earliest deadline among ready interactive sessions, or when a lockstep batch
    being gathered stops waiting (after ``now``), or None when there is neither. (A ready
    lockstep session otherwise waits for no time: ``plan`` launches it at once, or it
    waits behind an interactive deadline, which is the wakeup.)"""
    slots = list(slots)
    expecting = {(s.model_id, s.steps) for s in slots if s.expecting and not s.ready}
    dues = []
    for s in slots:
        if not s.ready:
            continue
        if not s.lockstep:
            dues.append(s.due)
        elif (
            now is not None
            and (s.model_id, s.steps) in expecting
            and s.due + LOCKSTEP_GATHER_S > now
        ):
            dues.append(s.due + LOCKSTEP_GATHER_S)
    return min(dues) if dues else None


def next_due(previous_due: float, interval: float, finished_at: float) -> float:
    """The deadline after ``previous_due``; a session that fell more than one interval
    behind restarts its clock at ``finished_at`` instead of bursting to catch up."""
    due = previous_due + interval
    return finished_at if finished_at - due > interval else due


EARLY_START_FRACTION = 0.25
"""How far (as a share of its frame interval) a session's frame may start before its
deadline once the control stamped for that frame has arrived (``start_due``)."""


def start_due(due: float, interval: float, control_waiting: bool) -> float:
    """When the frame due at ``due`` may start: at its deadline, or up to a quarter interval
    earlier when its control is already here, so a client that sends each control just
    before the frame's deadline (as games sample input late) gets the frame one step after
    the control. The deadline grid does not move (the next frame is still due at
    ``due + interval``), so a session never gets more than its fps."""
    return due - EARLY_START_FRACTION * interval if control_waiting else due


def effective_max_batch(max_batch: int, sample_bytes: int, budget_bytes: int) -> int:
    """The batch limit of a model under a memory budget (0 = no budget / unknown cost)."""
    size = max(1, max_batch)
    if budget_bytes > 0 and sample_bytes > 0:
        size = min(size, budget_bytes // sample_bytes)
    return max(1, size)


# ---- adaptive quality ----


@dataclass(frozen=True, slots=True)
class Level:
    """One rung of a session's quality ladder."""

    steps: int
    fps: float


def quality_ladder(
    ladder_steps: Sequence[int],
    steps: int,
    fps: float,
    *,
    adaptive: bool,
    min_steps: int = 0,
    min_fps: float = 0.0,
) -> tuple[Level, ...]:
    """The rungs from what the session asked for down to its floor.

    Fewer denoising steps first (each rung of the model's step ladder down to
    ``min_steps``, default its lowest), then a lower output fps (3/4, 1/2, 1/3 and 1/4 of
    the asked fps, not below ``min_fps``, default half the asked fps). A fixed policy has
    one rung.
    """
    levels = [Level(steps, fps)]
    if not adaptive:
        return tuple(levels)
    floor_steps = min_steps or min(ladder_steps, default=steps)
    for k in sorted((k for k in ladder_steps if floor_steps <= k < steps), reverse=True):
        levels.append(Level(k, fps))
    low = levels[-1].steps
    floor_fps = min_fps if min_fps > 0 else fps / 2
    for fraction in (0.75, 0.5, 1 / 3, 0.25):
        rung = fps * fraction
        if rung < floor_fps - 1e-9:
            if levels[-1].fps > floor_fps + 1e-9:
                levels.append(Level(low, floor_fps))
            break
        levels.append(Level(low, rung))
    return tuple(levels)


@dataclass(frozen=True, slots=True)
class QualityParams:
    """Thresholds of the quality controller (hysteresis: down fast, up slowly)."""

    window: int = 8
    """Recent frames per session over which deadline misses are counted."""
    down_after: int = 2
    """Misses within the window that step a session down one rung."""
    up_after: int = 48
    """Consecutive frames with slack before a session may climb one rung."""
    slack_fraction: float = 0.5
    """A frame has slack when it is ready within this fraction of an interval of its due."""
    cooldown_s: float = 1.0
    """No change to a session within this long of its previous change."""
    down_utilization: float = 0.9
    """After the first late session steps down, more late ones step down in the same round
    only while the predicted utilization stays above this."""
    up_utilization: float = 0.75
    """A climb happens only if the predicted utilization after it stays at or below this."""


@dataclass(frozen=True, slots=True)
class QualityView:
    """What the quality controller needs to know about one session."""

    session_id: str
    level: int
    costs: tuple[float, ...]
    """Predicted share of the step thread's time at each rung (fps x frame cost)."""
    misses: int
    """Deadline misses among its last ``window`` frames."""
    slack_streak: int
    """Consecutive recent frames that had slack."""
    changed_at: float
    """When its rung last changed (monotonic seconds; -inf if never)."""

    @property
    def rungs(self) -> int:
        return len(self.costs)


@dataclass(frozen=True, slots=True)
class QualityChange:
    session_id: str
    level: int
    reason: str
    """"deadline" (stepped down) or "slack" (climbed back)."""


def decide_quality(
    views: Iterable[QualityView], now: float, utilization: float, params: QualityParams
) -> list[QualityChange]:
    """Rung changes to make now, given each session's recent misses and the predicted
    utilization of the step thread at the current rungs.

    Down: every session with ``down_after`` misses and out of cooldown is a candidate,
    the one highest on its ladder first; the first steps down, further ones only while the
    predicted utilization is still above ``down_utilization``. Up (only when no session
    on the worker missed a deadline in its window): one session per round, the one
    lowest on its ladder first, if it had ``up_after`` frames of slack, is out of
    cooldown, and the predicted utilization after
    its climb is at most ``up_utilization``.
    """
    ordered = sorted(views, key=lambda v: v.session_id)
    cool = [v for v in ordered if now - v.changed_at >= params.cooldown_s]
    late = [v for v in cool if v.misses >= params.down_after and v.level + 1 < v.rungs]
    changes: list[QualityChange] = []
    for v in sorted(late, key=lambda v: v.level):
        if changes and utilization <= params.down_utilization:
            break
        changes.append(QualityChange(v.session_id, v.level + 1, "deadline"))
        utilization += v.costs[v.level + 1] - v.costs[v.level]
    if changes or any(v.misses for v in ordered):
        return changes  # no climb while any session on the worker is missing deadlines
    climbers = [
        v for v in cool if v.level > 0 and v.misses == 0 and v.slack_streak >= params.up_after
    ]
    for v in sorted(climbers, key=lambda v: (-v.level, v.changed_at)):
        after = utilization + v.costs[v.level - 1] - v.costs[v.level]
        if after <= params.up_utilization:
            return [QualityChange(v.session_id, v.level - 1, "slack")]
    return []


NEVER = -math.inf
