"""The quality governor over real session actors: misses step down, events reach the
client's queue, a control for the next frame pulls its deadline forward."""

from __future__ import annotations

from services.worker.actor import SessionActor
from services.worker.costs import StepCosts
from services.worker.quality import QualityGovernor
from services.worker.scheduler import QualityParams
from tests.fakes import FakeWorld
from windflow.v1 import windflow_pb2 as pb


def make_actor(sid: str, mode: pb.QualityPolicy.Mode.ValueType) -> SessionActor:
    model = FakeWorld()
    spec = pb.SessionSpec(
        model_id="fake-world", fps=20, steps=3, quality=pb.QualityPolicy(mode=mode)
    )
    return SessionActor(
        sid,
        spec,
        model,
        model.new_state(1),
        epoch=1,
        window=2,
        out_queue=3,
        max_pending_controls=3,
        now=0.0,
    )


def governor() -> QualityGovernor:
    costs = StepCosts()
    costs.observe("fake-world", 3, 1, 60.0)  # 20 fps x 60 ms: 1.2, overloaded
    costs.observe("fake-world", 3, 8, 480.0)
    return QualityGovernor(costs, {"fake-world": 8}, QualityParams(down_after=2, cooldown_s=1.0))


def test_misses_step_an_adaptive_session_down_and_tell_its_client() -> None:
    gov = governor()
    adaptive = make_actor("a", pb.QualityPolicy.MODE_ADAPTIVE)
    fixed = make_actor("f", pb.QualityPolicy.MODE_FIXED)
    gov.add(adaptive)
    gov.add(fixed)
    utilization = gov.utilization()
    assert utilization is not None and utilization > 1.0
    # two frames finished more than an interval (50 ms) after their due
    gov.after_step([adaptive, fixed], [0.0, 0.0], finished=0.06)
    assert gov.deadline_misses == 2 and not adaptive.out
    gov.after_step([adaptive, fixed], [0.1, 0.1], finished=0.16)
    assert gov.level("a") == (1, gov.level("a")[1]) and adaptive.steps == 2
    assert gov.level("f")[0] == 0 and fixed.steps == 3 and not fixed.out
    event = adaptive.out[-1].event
    assert event.kind == pb.SessionEvent.KIND_QUALITY_CHANGED
    assert (event.steps, event.level, event.fps) == (2, 1, 20.0)
    # within the cooldown nothing more changes, even with more misses
    gov.after_step([adaptive], [0.2], finished=0.3)
    gov.after_step([adaptive], [0.3], finished=0.4)
    assert gov.level("a")[0] == 1
    # past it, it keeps going down: 1 step, then the output fps (its interval) drops
    gov.after_step([adaptive], [1.2], finished=1.3)
    gov.after_step([adaptive], [1.3], finished=1.4)
    gov.after_step([adaptive], [2.5], finished=2.6)
    gov.after_step([adaptive], [2.6], finished=2.7)
    assert adaptive.steps == 1 and adaptive.interval == 1 / 15
    assert gov.quality_changes == 3
    assert gov.utilization(floor=True) is not None
