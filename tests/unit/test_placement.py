"""The router's placement core, on plain data."""

from __future__ import annotations

import pytest

from services.router.placement import WorkerView, choose_worker
from windflow.errors import NotFound, ResourceExhausted


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
