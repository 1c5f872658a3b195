"""Lockstep sessions in the scheduler core (services/worker/scheduler.py): they fill the
room interactive batches leave, go alone only before the next interactive deadline, the
longest waiting first, and never set a wakeup."""

from __future__ import annotations

from services.worker.scheduler import FILL_SLACK, CostFn, Slot, next_wakeup, plan

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
