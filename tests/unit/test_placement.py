"""The router's placement core, on plain data."""

from __future__ import annotations

import dataclasses

import pytest

from services.router.placement import WorkerView, choose_target, choose_worker
from windflow.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


def worker(
    wid: str, sessions: int, capacity: int = 4, region: str = "eu", models: tuple[str, ...] = ("m",)
) -> WorkerView:
    return WorkerView(wid, f"{wid}:1", region, frozenset(models), capacity, sessions)


def test_lowest_load_wins_ties_by_id() -> None:
    workers = [worker("b", 1), worker("a", 1), worker("c", 3)]
    assert choose_worker(workers, "m").worker_id == "a"
    assert (
        choose_worker([worker("x", 3, capacity=8), worker("y", 2, capacity=4)], "m").worker_id
        == "x"
    )


def test_model_and_capacity_filters() -> None:
    workers = [worker("full", 4), worker("other", 0, models=("n",)), worker("ok", 3)]
    assert choose_worker(workers, "m").worker_id == "ok"
    with pytest.raises(NotFound, match="no live worker serves model 'zzz'"):
        choose_worker(workers, "zzz")
    with pytest.raises(ResourceExhausted) as info:
        choose_worker([worker("full", 4)], "m")
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0


def test_region_preferred_then_any() -> None:
    workers = [worker("eu1", 2, region="eu"), worker("us1", 0, region="us")]
    assert choose_worker(workers, "m", region="eu").worker_id == "eu1"
    assert choose_worker(workers, "m", region="us").worker_id == "us1"
    assert (
        choose_worker([worker("eu1", 4), worker("us1", 1, region="us")], "m", "eu").worker_id
        == "us1"
    )
    assert choose_worker(workers, "m", region="ap").worker_id == "us1"


def test_excluded_workers_are_skipped() -> None:
    workers = [worker("a", 0), worker("b", 1)]
    assert choose_worker(workers, "m", exclude=["a"]).worker_id == "b"
    with pytest.raises(NotFound):
        choose_worker(workers, "m", exclude=["a", "b"])


def test_affinity_wins_when_it_fits() -> None:
    workers = [worker("busy", 3), worker("idle", 0)]
    assert choose_worker(workers, "m", prefer="busy").worker_id == "busy"
    assert (
        choose_worker([worker("busy", 4), worker("idle", 0)], "m", prefer="busy").worker_id
        == "idle"
    )
    assert choose_worker(workers, "m", prefer="gone").worker_id == "idle"


def test_fps_admission_places_only_where_the_fps_fits() -> None:
    from services.router.placement import Demand

    roomy = WorkerView("w1", "a1", "r", frozenset({"m"}), 8, 6, {("m", 1): 30.0, ("m", 2): 15.0})
    tight = WorkerView("w2", "a2", "r", frozenset({"m"}), 8, 0, {("m", 1): 10.0, ("m", 2): 5.0})
    adaptive = Demand("m", fps=24.0, steps=2)  # floor: the lowest rung, 1 step
    assert choose_worker([roomy, tight], "m", demand=adaptive).worker_id == "w1"
    fixed = Demand("m", fps=24.0, steps=2, adaptive=False)  # needs 24 fps at 2 steps
    with pytest.raises(ResourceExhausted) as err:
        choose_worker([roomy, tight], "m", demand=fixed, retry_after_s=3.0)
    assert err.value.retry_after_s == 3.0
    assert "the most is 15.0 fps on w1" in err.value.message  # says what there is
    assert choose_worker([roomy, tight], "m", demand=Demand("m", 4.0, 2)).worker_id == "w2"
    # admitting shrinks the view's headroom until the worker's own update arrives
    after = roomy.admit(adaptive)
    assert after.sessions == 7
    assert after.headroom[("m", 1)] == pytest.approx(6.0)
    assert not after.fits(adaptive)
    # a worker publishing no headroom is admitted by slots only
    legacy = WorkerView("w3", "a3", "r", frozenset({"m"}), 8, 0)
    assert choose_worker([legacy], "m", demand=fixed).worker_id == "w3"


def test_a_draining_worker_takes_nothing_new() -> None:
    workers = [dataclasses.replace(worker("idle", 0), draining=True), worker("busy", 3)]
    assert choose_worker(workers, "m").worker_id == "busy"
    with pytest.raises(NotFound):
        choose_worker(workers[:1], "m")


def test_migration_targets_and_why_not() -> None:
    workers = [
        worker("src", 2, region="eu"),
        worker("eu2", 3, region="eu"),
        worker("us1", 0, region="us"),
        worker("full", 4, region="us"),
        worker("other", 0, region="us", models=("n",)),
        dataclasses.replace(worker("drain", 0, region="eu"), draining=True),
    ]
    # the session's own region first, even when another is idler; never the source
    assert choose_target(workers, "m", "src", prefer_region="eu").worker_id == "eu2"
    assert choose_target(workers, "m", "src").worker_id == "us1"
    assert choose_target(workers, "m", "src", region="us").worker_id == "us1"
    assert choose_target(workers, "m", "src", to_worker="eu2").worker_id == "eu2"
    refusals: list[tuple[dict[str, str], type[Exception], str]] = [
        ({"to_worker": "nope"}, InvalidArgument, "no live worker 'nope'"),
        ({"to_worker": "src"}, FailedPrecondition, "on src already"),
        ({"to_worker": "drain"}, FailedPrecondition, "draining"),
        ({"to_worker": "other"}, FailedPrecondition, "does not serve model 'm'"),
        ({"to_worker": "full"}, ResourceExhausted, "no room"),
        ({"region": "mars"}, InvalidArgument, "no worker in region 'mars'"),
    ]
    for kwargs, error, match in refusals:
        with pytest.raises(error, match=match):
            choose_target(workers, "m", "src", **kwargs)  # type: ignore[arg-type]
    # the last worker of a model: it stays, and the error says so
    with pytest.raises(FailedPrecondition, match="the session stays on src"):
        choose_target([worker("src", 1), worker("x", 0, models=("n",))], "m", "src")


def test_a_lockstep_session_reserves_no_fps_only_a_slot() -> None:
    from services.router.service import demand_of
    from windflow.v1 import windflow_pb2 as pb

    spec = pb.SessionSpec(model_id="m", fps=24.0, steps=2, session_class=pb.SESSION_CLASS_LOCKSTEP)
    demand = demand_of(spec)
    assert demand.fps == 0.0
    tight = WorkerView("w2", "a2", "r", frozenset({"m"}), 8, 0, {("m", 1): 5.0, ("m", 2): 2.0})
    for _ in range(8):  # (a slot each, whatever the fps)
        assert tight.fits(demand)
        tight = tight.admit(demand)
    assert tight.headroom[("m", 1)] == pytest.approx(5.0)
    with pytest.raises(ResourceExhausted):
        choose_worker([tight], "m", demand=demand)
