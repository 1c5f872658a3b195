"""Lockstep sessions in the scheduler core (services/worker/scheduler.py): they fill the
room interactive batches leave, go alone only before the next interactive deadline, the
longest waiting first, and never set a wakeup."""

from __future__ import annotations

import pytest

from services.worker.scheduler import (
    FILL_SLACK,
    LOCKSTEP_GATHER_S,
    CostFn,
    Slot,
    next_wakeup,
    plan,
)

MAX = {"m": 4}


def player(sid: str, due: float, steps: int = 2) -> Slot:
    return Slot(sid, "m", steps, due, True)


def sim(sid: str, since: float, steps: int = 2, ready: bool = True) -> Slot:
    return Slot(sid, "m", steps, since, ready, lockstep=True)


def linear(per_frame_s: float, fixed_s: float = 0.0) -> CostFn:
    def cost(model: str, steps: int, batch: int) -> float | None:
        return fixed_s + per_frame_s * batch

    return cost


def test_lockstep_sessions_fill_an_interactive_batch_up_to_its_max() -> None:
    slots = [player("p", 1.0), sim("s2", 0.5), sim("s1", 0.2), sim("s3", 0.7), sim("s4", 0.9)]
    batches = plan(slots, now=1.0, horizon=0.01, max_batch=MAX)
    assert [b.session_ids for b in batches] == [("p", "s1", "s2", "s3")]  # longest waiting


def test_filling_stops_where_the_batch_would_be_too_much_slower() -> None:
    # 10 ms fixed + 2 ms a frame: one player = 12 ms; +25% allows 15 ms: one more frame
    slots = [player("p", 1.0), sim("a", 0.1), sim("b", 0.2), sim("c", 0.3)]
    cost = linear(0.002, 0.010)
    batches = plan(slots, now=1.0, horizon=0.01, max_batch=MAX, cost_s=cost)
    assert [b.session_ids for b in batches] == [("p", "a")]
    assert 0.014 <= 0.012 * (1 + FILL_SLACK) < 0.016  # (2 and 3 frames against 1)


def test_lockstep_goes_alone_only_before_the_next_interactive_deadline() -> None:
    sims = [sim(f"s{i}", 0.1 * i) for i in range(6)]
    cost = linear(0.001, 0.004)  # a batch of 4: 8 ms, of 2: 6 ms
    # the player's frame is due in 20 ms: both batches (8 + 6 ms) fit before it
    batches = plan([player("p", 1.020), *sims], now=1.0, horizon=0.01, max_batch=MAX, cost_s=cost)
    assert [b.session_ids for b in batches] == [("s0", "s1", "s2", "s3"), ("s4", "s5")]
    # due in 10 ms: only the first fits
    batches = plan([player("p", 1.010), *sims], now=1.0, horizon=0.01, max_batch=MAX, cost_s=cost)
    assert [b.session_ids for b in batches] == [("s0", "s1", "s2", "s3")]
    # due in 5 ms: none; unknown costs: none while a player waits
    assert (
        plan([player("p", 1.005), *sims], now=1.0, horizon=0.01, max_batch=MAX, cost_s=cost) == []
    )
    assert plan([player("p", 1.5), *sims], now=1.0, horizon=0.01, max_batch=MAX) == []


def test_without_interactive_sessions_lockstep_runs_freely() -> None:
    sims = [sim("a", 0.3), sim("b", 0.1), sim("c", 0.2, steps=1), sim("idle", 0.0, ready=False)]
    batches = plan(sims, now=1.0, horizon=0.01, max_batch=MAX)
    assert sorted(b.session_ids for b in batches) == [("b", "a"), ("c",)]


def test_a_lockstep_session_sets_no_wakeup() -> None:
    assert next_wakeup([sim("a", 0.0)]) is None
    assert next_wakeup([sim("a", 0.0), player("p", 2.0)]) == 2.0


def test_the_largest_batch_that_ends_before_the_deadline_goes() -> None:
    sims = [sim(f"s{i:02d}", 0.5 + i * 1e-4) for i in range(32)]
    cost = linear(0.002, 0.004)  # 16 sessions: 36 ms; 15: 34 ms
    batches = plan(
        [player("p", 1.034), *sims], now=1.0, horizon=0.01, max_batch={"m": 16}, cost_s=cost
    )
    assert [len(b.session_ids) for b in batches] == [15]
    assert batches[0].session_ids == tuple(f"s{i:02d}" for i in range(15))


def expecting(sid: str) -> Slot:
    return Slot(sid, "m", 2, 0.0, False, lockstep=True, expecting=True)


def test_lockstep_controls_arriving_together_are_gathered_into_one_batch() -> None:
    # three controls just came (their due: when), a fourth session expects one: wait for
    # it, a moment at most
    fresh = [sim(f"s{i}", 1.0 - 0.0005) for i in range(3)]
    waiting = [*fresh, expecting("s3")]
    assert plan(waiting, now=1.0, horizon=0.01, max_batch=MAX) == []
    assert next_wakeup(waiting, now=1.0) == pytest.approx(1.0 - 0.0005 + LOCKSTEP_GATHER_S)
    # its control comes: the full batch goes at once
    full = [*fresh, sim("s3", 1.0)]
    assert [len(b.session_ids) for b in plan(full, now=1.0, horizon=0.01, max_batch=MAX)] == [4]
    # with no one else expecting a control, what is there goes at once
    assert [len(b.session_ids) for b in plan(fresh, now=1.0, horizon=0.01, max_batch=MAX)] == [3]
    # the oldest has waited the gathering time: what is there goes
    later = 1.0 - 0.0005 + LOCKSTEP_GATHER_S
    went = plan(waiting, now=later, horizon=0.01, max_batch=MAX)
    assert [len(b.session_ids) for b in went] == [3]
    assert next_wakeup(waiting, now=later) is None
