"""A plan checked by simulation through the runtime's scheduler, quality and admission
cores (windflow/ops/simulate.py): ample capacity meets every deadline, too little is
refused, an over-full replica misses deadlines and steps its sessions down."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.test_planner import MODEL, SLOW, demand, make_profile, problem, worker_class
from windflow.ops import planner
from windflow.ops.profile import Profile
from windflow.ops.simulate import HORIZON_S, LEAD_S, RETRY_AFTER_S, simulate


def _setup(peak: int, **kw: object) -> tuple[planner.Problem, dict[tuple[str, str], Profile]]:
    profile = make_profile("a", SLOW)
    prob = problem([demand(peak, **kw)], [worker_class("a", 1.0)], {"a": profile})
    return prob, {(MODEL, "a"): profile}


def test_ample_capacity_meets_every_deadline() -> None:
    prob, profiles = _setup(20)
    plan = planner.solve(prob)
    assert sum(line.replicas for line in plan.lines) == 2  # 15 sessions a replica
    result = simulate(plan, prob.demands, profiles, seconds=6.0, seed=3)
    assert result.admitted == 20
    assert result.refusals == 0
    assert result.deadline_attainment == 1.0
    assert result.skipped == 0
    assert result.quality_changes == 0
    # 20 sessions at 10 fps for ~6 s, less the ramp
    assert 900 <= result.frames <= 1200
    assert result.per_demand["d1"]["deadline_attainment"] == 1.0


def test_too_little_capacity_is_refused() -> None:
    prob, profiles = _setup(30)
    option = prob.options[0]
    assert option.sessions == 15
    plan = planner.Plan([planner.PlanLine(option, 1, False)], "milp", 0.0)
    result = simulate(plan, prob.demands, profiles, seconds=5.0, seed=1)
    assert result.admitted == 15
    # 15 users refused at once, then again every 2 s while the others hold their sessions
    assert result.refusals >= 15 * 2
    assert result.deadline_attainment == 1.0  # what was admitted is served on time


def test_an_overfull_replica_misses_deadlines_and_steps_sessions_down() -> None:
    prob, profiles = _setup(24, min_steps=1)
    rung0 = next(o for o in prob.options if o.rung == 0)
    # a plan that lies: 24 sessions at 2 steps on one replica (utilization 1.44)
    liar = replace(rung0, capacity=replace(rung0.capacity, sessions=24))
    plan = planner.Plan([planner.PlanLine(liar, 1, False)], "milp", 0.0)
    result = simulate(
        plan,
        prob.demands,
        profiles,
        seconds=6.0,
        seed=2,
        target_utilization=10.0,  # let admission take them all
    )
    assert result.admitted == 24
    assert result.deadline_attainment < 0.99
    assert result.quality_changes > 0
    assert result.below_plan_share > 0


def test_the_simulated_engine_uses_the_worker_defaults() -> None:
    from services.worker.config import WorkerConfig
    from services.worker.engine import HOST_LEAD_S, WAKE_LEAD_S

    defaults = WorkerConfig(etcd="e", nats="n", worker_id="w")
    assert pytest.approx(WAKE_LEAD_S + HOST_LEAD_S) == LEAD_S
    assert pytest.approx(defaults.batch_horizon_ms / 1000.0) == HORIZON_S
    assert defaults.admission_retry_after_s == RETRY_AFTER_S
    assert defaults.target_utilization == 0.9
