"""Chaos schedules: a seed is its schedule, and every schedule is one the player can play."""

from __future__ import annotations

from windflow.chaos import schedule
from windflow.chaos.schedule import CI, FULL, Schedule, for_seed
from windflow.common import faults

SEEDS = range(300)


def test_a_seed_is_its_schedule() -> None:
    assert for_seed(7) == for_seed(7)
    assert for_seed(7).to_json() == for_seed(7).to_json()
    assert for_seed(7) != for_seed(8)
    assert for_seed(7, CI) != for_seed(7)
    text = for_seed(7).describe()
    assert text.startswith("schedule seed=7 ") and "attach 0: fresh" in text


def _playable(plan: Schedule, n_actions: int = 5) -> None:
    shape = FULL
    assert shape.sessions[0] <= len(plan.sessions) <= shape.sessions[1]
    for script in plan.sessions:
        first = script.attaches[0]
        assert not first.resume  # nothing to resume yet
        # frame 0's action is set in the first Attach, so every frame's action is known
        assert first.controls[0] == schedule.Control(0, 0, first.controls[0].action, "valid")
        for attach in script.attaches:
            assert [c.after for c in attach.controls] == sorted(c.after for c in attach.controls)
            for c in attach.controls:
                assert c.kind in schedule.CONTROL_KINDS
                assert 0 <= c.after <= attach.frames
                if c.after == 0:  # in the Attach message: all or none, so only valid ones
                    assert c.kind == "valid" and c.offset >= 0
                if c.kind == "invalid":
                    assert c.action >= n_actions
                else:
                    assert 0 <= c.action < n_actions
                if c.kind == "late":  # a frame this attach already received
                    assert -c.after <= c.offset < 0
                if c.kind == "burst":
                    assert attach.frames >= c.after + c.count
    faults_at = [f.at_frames for f in plan.faults]
    assert faults_at == sorted(faults_at) and all(0 < at < plan.frames for at in faults_at)
    for fault in plan.faults:
        assert fault.kind in schedule.FAULT_KINDS
        assert 0 <= fault.target < len(plan.sessions)
        if fault.kind == "stop_worker":  # past the lease: the router moves the sessions
            assert fault.duration_s > schedule.LEASE_TTL_S
    if plan.log_faults:
        (rule,) = faults.parse(plan.log_faults)
        assert rule.point == "log.append"


def test_every_schedule_is_playable() -> None:
    for seed in SEEDS:
        _playable(for_seed(seed))


def test_schedules_cover_every_fault_and_control_kind() -> None:
    plans = [for_seed(seed) for seed in SEEDS]
    fault_kinds = {f.kind for p in plans for f in p.faults}
    control_kinds = {
        c.kind for p in plans for s in p.sessions for a in s.attaches for c in a.controls
    }
    assert fault_kinds == set(schedule.FAULT_KINDS)
    assert control_kinds == set(schedule.CONTROL_KINDS)
    errors = {p.log_faults.split("=")[1].split("%")[0].split("@")[0] for p in plans if p.log_faults}
    assert errors == set(faults.ERRORS)
    assert any(a.resume for p in plans for s in p.sessions for a in s.attaches)
    bursts = [c.count for p in plans for s in p.sessions for a in s.attaches for c in a.controls]
    assert max(bursts) > 256  # past a session's pending limit: some of the burst is refused


def test_ci_schedules_are_small() -> None:
    for seed in range(50):
        plan = for_seed(seed, CI)
        assert len(plan.sessions) <= CI.sessions[1]
        assert plan.frames <= CI.sessions[1] * CI.attaches[1] * CI.frames[1]
        assert all(c.kind != "burst" for s in plan.sessions for a in s.attaches for c in a.controls)
