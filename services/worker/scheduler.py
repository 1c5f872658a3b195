"""The worker's step scheduler: a pure core, plain data in, decisions out.

Earliest-deadline-first over the sessions' next frame deadlines; sessions of one model at
one step count that are due within ``horizon`` of the earliest deadline share one batched
model step, up to the model's max batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


@dataclass(frozen=True, slots=True)
class Batch:
    model_id: str
    steps: int
    session_ids: tuple[str, ...]
    due: float
    """The earliest deadline in the batch."""


def plan(
    slots: Iterable[Slot], now: float, *, horizon: float, max_batch: Mapping[str, int]
) -> list[Batch]:
    """Batches to step now, most urgent first. Empty when nothing is due by ``now``."""
    ready = sorted((s for s in slots if s.ready), key=lambda s: (s.due, s.session_id))
    if not ready or ready[0].due > now:
        return []
    cutoff = max(now, ready[0].due) + horizon
    groups: dict[tuple[str, int], list[Slot]] = {}
    for slot in ready:
        if slot.due > cutoff:
            break
        groups.setdefault((slot.model_id, slot.steps), []).append(slot)
    batches: list[Batch] = []
    for (model_id, steps), members in groups.items():
        size = max(1, max_batch.get(model_id, 1))
        for i in range(0, len(members), size):
            chunk = members[i : i + size]
            batches.append(Batch(model_id, steps, tuple(s.session_id for s in chunk), chunk[0].due))
    batches.sort(key=lambda b: (b.due, b.session_ids))
    return batches


def next_wakeup(slots: Iterable[Slot]) -> float | None:
    """The earliest deadline among ready sessions, or None when none is ready."""
    dues = [s.due for s in slots if s.ready]
    return min(dues) if dues else None


def next_due(previous_due: float, interval: float, finished_at: float) -> float:
    """The deadline after ``previous_due``; a session that fell more than one interval
    behind restarts its clock at ``finished_at`` instead of bursting to catch up."""
    due = previous_due + interval
    return finished_at if finished_at - due > interval else due
