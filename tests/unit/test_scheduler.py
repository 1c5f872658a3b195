"""The worker's EDF scheduler core, on plain data."""

from __future__ import annotations

from services.worker.scheduler import Slot, next_due, next_wakeup, plan, start_due

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


# ---- memory budget ----


def test_memory_budget_caps_the_batch() -> None:
    from services.worker.scheduler import effective_max_batch

    assert effective_max_batch(8, 0, 0) == 8
    assert effective_max_batch(8, 100, 0) == 8
    assert effective_max_batch(8, 100, 350) == 3
    assert effective_max_batch(8, 100, 50) == 1  # one sample always fits


# ---- quality ladder and hysteresis ----

from services.worker.scheduler import (  # noqa: E402
    NEVER,
    Level,
    QualityChange,
    QualityParams,
    QualityView,
    decide_quality,
    quality_ladder,
)

P = QualityParams(down_after=2, up_after=10, cooldown_s=1.0, up_utilization=0.75)


def test_ladder_steps_down_first_then_fps() -> None:
    ladder = quality_ladder((1, 2, 3, 4), 3, 24.0, adaptive=True)
    assert ladder == (
        Level(3, 24.0),
        Level(2, 24.0),
        Level(1, 24.0),
        Level(1, 18.0),
        Level(1, 12.0),
    )
    assert quality_ladder((1, 2, 3, 4), 3, 24.0, adaptive=False) == (Level(3, 24.0),)
    floored = quality_ladder((1, 2, 3, 4), 4, 20.0, adaptive=True, min_steps=3, min_fps=8.0)
    assert floored == (
        Level(4, 20.0),
        Level(3, 20.0),
        Level(3, 15.0),
        Level(3, 10.0),
        Level(3, 8.0),
    )


def view(
    sid: str,
    level: int,
    misses: int = 0,
    slack: int = 0,
    changed: float = NEVER,
    costs: tuple[float, ...] = (0.4, 0.3, 0.2),
) -> QualityView:
    return QualityView(sid, level, costs, misses, slack, changed)


def test_misses_step_down_highest_quality_first_until_under_the_ceiling() -> None:
    views = [view("a", 1, misses=3), view("b", 0, misses=2), view("c", 0, misses=5)]
    # utilization 1.3: b (level 0) steps down (-0.1 -> 1.2), then c (-> 1.1), then a (-> 1.0)
    changes = decide_quality(views, now=10.0, utilization=1.3, params=P)
    assert changes == [
        QualityChange("b", 1, "deadline"),
        QualityChange("c", 1, "deadline"),
        QualityChange("a", 2, "deadline"),
    ]
    # once under the ceiling only the first late session steps down
    changes = decide_quality(views, now=10.0, utilization=0.5, params=P)
    assert changes == [QualityChange("b", 1, "deadline")]


def test_no_change_within_cooldown_or_below_the_floor() -> None:
    assert decide_quality([view("a", 0, misses=5, changed=9.5)], 10.0, 1.5, P) == []
    assert decide_quality([view("a", 2, misses=5)], 10.0, 1.5, P) == []  # already at the floor
    assert decide_quality([view("a", 0, misses=1)], 10.0, 1.5, P) == []  # one miss is noise


def test_climb_needs_slack_streak_cooldown_and_predicted_room() -> None:
    ok = view("a", 2, slack=10, changed=5.0)
    assert decide_quality([ok], 10.0, 0.5, P) == [QualityChange("a", 1, "slack")]
    assert decide_quality([view("a", 2, slack=9)], 10.0, 0.5, P) == []  # streak too short
    assert decide_quality([view("a", 2, slack=99, changed=9.5)], 10.0, 0.5, P) == []
    # 0.7 + (0.3 - 0.2) = 0.8 > 0.75: would overload again, so it stays down
    assert decide_quality([ok], 10.0, 0.7, P) == []
    # one climb per round, the session lowest on its ladder first
    two = [view("a", 1, slack=20), view("b", 2, slack=20)]
    assert decide_quality(two, 10.0, 0.3, P) == [QualityChange("b", 1, "slack")]
    # any late session blocks climbs
    late = [view("a", 2, slack=20), view("b", 0, misses=2)]
    assert decide_quality(late, 10.0, 0.3, P) == [QualityChange("b", 1, "deadline")]


def test_hysteresis_does_not_flap_on_a_steady_load() -> None:
    """Simulate a session whose rung 0 overloads the worker (util 1.1) and rung 1 fits
    (0.85): it steps down once and stays down, since climbing would exceed 0.75."""
    costs = (1.1, 0.85, 0.6)
    level, changed, changes = 0, NEVER, []
    for tick in range(200):
        now = tick * 0.1
        util = costs[level]
        misses = 3 if util > 1.0 else 0
        slack = 100 if util <= 1.0 else 0
        out = decide_quality([QualityView("a", level, costs, misses, slack, changed)], now, util, P)
        for c in out:
            level, changed = c.level, now
            changes.append((now, c.level))
    assert changes == [(0.0, 1)]


def test_no_climb_while_another_session_misses_deadlines() -> None:
    views = [view("a", 2, slack=20), view("b", 2, misses=1)]  # b: below the down threshold
    assert decide_quality(views, 10.0, 0.3, P) == []


def test_a_waiting_control_lets_its_frame_start_a_quarter_interval_early() -> None:
    interval = 0.04
    assert start_due(1.0, interval, control_waiting=False) == 1.0
    early = start_due(1.0, interval, control_waiting=True)
    assert early == 1.0 - 0.25 * interval
    # planned at once when the control arrives inside that window, not before it
    assert plan([slot("a", early)], now=0.995, horizon=0.001, max_batch=MAX) != []
    assert plan([slot("a", early)], now=0.985, horizon=0.001, max_batch=MAX) == []
    # the grid does not move: the next frame is due one interval after the deadline, so
    # early starts never raise a session's frame rate
    assert next_due(1.0, interval, finished_at=0.996) == 1.0 + interval
