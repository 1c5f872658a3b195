"""The worker's EDF scheduler core, on plain data."""

from __future__ import annotations

from services.worker.scheduler import Slot, next_due, next_wakeup, plan

MAX = {"m": 4, "n": 2}


def slot(sid: str, due: float, model: str = "m", steps: int = 2, ready: bool = True) -> Slot:
    return Slot(sid, model, steps, due, ready)


def test_nothing_due_means_no_batches() -> None:
    assert plan([slot("a", 1.0)], now=0.5, horizon=0.01, max_batch=MAX) == []
    assert plan([], now=0.5, horizon=0.01, max_batch=MAX) == []


def test_earliest_deadline_first_and_horizon_batching() -> None:
    slots = [slot("late", 1.004), slot("first", 0.99), slot("far", 1.5), slot("b", 1.0)]
    batches = plan(slots, now=1.0, horizon=0.005, max_batch=MAX)
    assert len(batches) == 1
    assert batches[0].session_ids == ("first", "b", "late")
    assert batches[0].due == 0.99


def test_batches_split_by_model_steps_and_max_batch() -> None:
    slots = [slot(f"s{i}", 1.0 + i * 1e-4) for i in range(6)]
    slots += [slot("k1", 0.9, steps=1), slot("n1", 0.95, model="n"), slot("n2", 1.0, model="n")]
    slots.append(slot("n3", 1.0, model="n"))
    batches = plan(slots, now=1.0, horizon=0.01, max_batch=MAX)
    assert [b.session_ids for b in batches] == [
        ("k1",),
        ("n1", "n2"),
        ("n3",),
        ("s0", "s1", "s2", "s3"),
        ("s4", "s5"),
    ]
    assert [b.steps for b in batches] == [1, 2, 2, 2, 2]


def test_sessions_not_ready_are_skipped() -> None:
    slots = [slot("paused", 0.0, ready=False), slot("go", 0.5)]
    assert [b.session_ids for b in plan(slots, 1.0, horizon=0.0, max_batch=MAX)] == [("go",)]
    assert next_wakeup(slots) == 0.5
    assert next_wakeup([slot("x", 0.0, ready=False)]) is None


def test_next_due_paces_and_does_not_burst_after_falling_behind() -> None:
    assert next_due(1.0, 0.1, finished_at=1.02) == 1.1
    # slightly late: keep the cadence (the next frame comes sooner)
    assert next_due(1.0, 0.1, finished_at=1.15) == 1.1
    # far behind: restart the clock now instead of a burst of catch-up frames
    assert next_due(1.0, 0.1, finished_at=1.5) == 1.5
