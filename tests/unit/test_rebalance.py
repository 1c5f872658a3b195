"""The router's rebalancing core, on plain data: when a skewed load moves sessions, which
ones, and where to."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import pytest

from services.router.placement import Demand, WorkerView
from services.router.rebalance import (
    Move,
    RebalanceParams,
    SessionView,
    overloaded,
    plan_moves,
)
from windflow.errors import InvalidArgument

NOW = 1000.0
ONE = RebalanceParams()
"""One move per worker at once (the default)."""
MANY = RebalanceParams(max_per_worker=8, max_moves=8)


def worker(
    wid: str,
    sessions: int,
    capacity: int = 4,
    region: str = "eu",
    models: tuple[str, ...] = ("m",),
    draining: bool = False,
) -> WorkerView:
    return WorkerView(
        wid, f"{wid}:1", region, frozenset(models), capacity, sessions, draining=draining
    )


def placed(
    wid: str, n: int, region: str = "eu", model: str = "m", first: int = 0
) -> list[SessionView]:
    return [SessionView(f"{wid}-s{i}", model, region) for i in range(first, first + n)]


def plan(
    workers: Sequence[WorkerView],
    sessions: Mapping[str, Sequence[SessionView]] | None = None,
    *,
    params: RebalanceParams = ONE,
    active: Collection[str] = (),
    moving: Mapping[str, int] | None = None,
    last_moved: Mapping[str, float] | None = None,
    settling: Collection[str] = (),
) -> list[Move]:
    """``plan_moves`` with every worker's sessions placed in its region unless given."""
    if sessions is None:
        sessions = {w.worker_id: placed(w.worker_id, w.sessions, w.region) for w in workers}
    return plan_moves(
        workers,
        sessions,
        moving=moving or {},
        last_moved=last_moved or {},
        now=NOW,
        params=params,
        active=active,
        settling=settling,
    )


def applied(workers: Sequence[WorkerView], moves: Sequence[Move]) -> list[WorkerView]:
    """The workers (slot-based) as they are once ``moves`` are done."""
    delta = {w.worker_id: 0 for w in workers}
    for move in moves:
        delta[move.from_worker_id] -= 1
        delta[move.to_worker_id] += 1
    return [dataclasses.replace(w, sessions=w.sessions + delta[w.worker_id]) for w in workers]


def test_a_skewed_load_moves_sessions_to_the_idle_worker_until_even() -> None:
    workers = [worker("a", 4), worker("b", 0)]
    assert plan(workers) == [Move("a-s0", "a", "b")]  # one move per worker at once
    assert overloaded(workers, (), ONE) == {"a"}
    # with room for more at once: two moves make it 2 / 2, and the round stops there
    assert plan(workers, params=MANY) == [Move("a-s0", "a", "b"), Move("a-s1", "a", "b")]


def test_a_load_within_the_gap_moves_nothing() -> None:
    for workers in (
        [worker("a", 3), worker("b", 2)],
        [worker("a", 2), worker("b", 2)],
        [worker("a", 1, capacity=8), worker("b", 0, capacity=8)],
        [worker("a", 4)],  # alone: nowhere to go, and it is the mean
    ):
        assert overloaded(workers, (), ONE) == frozenset()
        assert plan(workers, params=MANY) == []


def test_hysteresis_a_worker_between_the_gaps_is_drained_only_in_an_episode() -> None:
    workers = [worker("a", 3), worker("b", 1)]  # 0.75 vs a mean of 0.5: a gap of 0.25
    assert overloaded(workers, (), ONE) == frozenset()
    assert plan(workers) == []
    assert overloaded(workers, {"a"}, ONE) == {"a"}
    assert plan(workers, active={"a"}) == [Move("a-s0", "a", "b")]
    # within stop_gap of the mean the episode ends
    even = [worker("a", 5, capacity=10), worker("b", 4, capacity=10)]  # gap 0.05
    assert overloaded(even, {"a"}, ONE) == frozenset()
    assert plan(even, active={"a"}) == []
    # the state is idempotent: what a round computes is what the plan uses
    skewed = [worker("a", 4), worker("b", 0)]
    assert overloaded(skewed, overloaded(skewed, {"b"}, ONE), ONE) == {"a"}


def test_cooldown_a_moved_session_waits() -> None:
    workers = [worker("a", 4), worker("b", 0)]
    cooling = {"a-s0": NOW - 10.0}
    assert plan(workers, last_moved=cooling) == [Move("a-s1", "a", "b")]
    assert plan(workers, last_moved={"a-s0": NOW - 30.0}) == [Move("a-s0", "a", "b")]
    everyone = {f"a-s{i}": NOW - 1.0 for i in range(4)}
    assert plan(workers, last_moved=everyone) == []


def test_per_worker_cap_counts_moves_in_flight_as_source_and_target() -> None:
    workers = [worker("a", 4), worker("b", 0), worker("c", 0)]
    assert plan(workers) == [Move("a-s0", "a", "b")]
    assert plan(workers, moving={"b": 1}) == [Move("a-s0", "a", "c")]
    assert plan(workers, moving={"a": 1}) == []  # the source is busy
    assert plan(workers, moving={"b": 1, "c": 1}) == []  # every target is
    two = RebalanceParams(max_per_worker=2)
    assert plan(workers, params=two, moving={"a": 1}) == [Move("a-s0", "a", "b")]
    # a worker whose move just ended waits for its load to count that move
    assert plan(workers, settling={"b"}) == [Move("a-s0", "a", "c")]
    assert plan(workers, settling={"a"}) == []
    # max_moves bounds a round
    assert len(plan(workers, params=RebalanceParams(max_per_worker=8, max_moves=1))) == 1


def test_never_to_a_draining_worker_one_without_the_model_or_without_room() -> None:
    source = worker("a", 4, capacity=4)
    for target in (
        worker("b", 0, draining=True),
        worker("b", 0, models=("other",)),
        dataclasses.replace(worker("b", 2, capacity=2), utilization=0.1),  # idle, but full
    ):
        assert plan([source, target], params=MANY) == [], target
    # only the sessions of a model the target serves move there
    sessions = {"a": [SessionView("a-n", "n", "eu"), *placed("a", 3)], "b": []}
    mixed = [worker("a", 4, models=("m", "n")), worker("b", 0, models=("n",))]
    assert plan(mixed, sessions) == [Move("a-n", "a", "b")]
    # a draining worker is neither a source nor in the mean: its drain moves its sessions
    assert plan([worker("a", 4, draining=True), worker("b", 0)]) == []
    assert overloaded([worker("a", 4, draining=True), worker("b", 1)], (), ONE) == frozenset()


def test_the_target_must_fit_the_sessions_fps() -> None:
    demand = Demand("m", fps=24.0, steps=2, adaptive=False)
    sessions = {"a": [SessionView("a-s0", "m", "eu", demand)], "b": [], "c": []}
    busy = WorkerView("a", "a:1", "eu", frozenset({"m"}), 8, 1, {("m", 2): 0.0}, 0.95)
    tight = WorkerView("b", "b:1", "eu", frozenset({"m"}), 8, 0, {("m", 2): 10.0}, 0.0)
    roomy = WorkerView("c", "c:1", "eu", frozenset({"m"}), 8, 0, {("m", 2): 48.0}, 0.0)
    assert plan([busy, tight], sessions) == []
    assert plan([busy, tight, roomy], sessions) == [Move("a-s0", "a", "c")]


def test_predicted_utilization_is_the_load_when_published() -> None:
    """Slots say even (2 / 2), utilization says skewed: it moves; the target's load after
    the move is counted in by its headroom, as placement does."""
    demand = Demand("m", fps=24.0, steps=1)
    hot = WorkerView("a", "a:1", "eu", frozenset({"m"}), 8, 2, {("m", 1): 10.0}, 0.9)
    cool = WorkerView("b", "b:1", "eu", frozenset({"m"}), 8, 2, {("m", 1): 96.0}, 0.2)
    sessions = {
        "a": [SessionView(f"a-s{i}", "m", "eu", demand) for i in range(2)],
        "b": [SessionView(f"b-s{i}", "m", "eu", demand) for i in range(2)],
    }
    assert plan([hot, cool], sessions) == [Move("a-s0", "a", "b")]
    # in an episode, a target that ends below the source's 0.9 takes one: 24 of its 48 fps
    # of room halve its free fraction, 0.4 -> 0.7
    warm = WorkerView("b", "b:1", "eu", frozenset({"m"}), 8, 2, {("m", 1): 48.0}, 0.4)
    assert plan([hot, warm], sessions, active={"a"}) == [Move("a-s0", "a", "b")]
    # ... and one that would end at 0.9 (24 of its 30 fps: 0.5 -> 0.9) does not: no gain
    even = WorkerView("b", "b:1", "eu", frozenset({"m"}), 8, 2, {("m", 1): 30.0}, 0.5)
    assert plan([hot, even], sessions, active={"a"}) == []


def test_region_the_sessions_own_first_and_a_session_at_home_stays_there() -> None:
    workers = [worker("a", 4, region="eu"), worker("us", 0, region="us"), worker("eu2", 1)]
    assert plan(workers) == [Move("a-s0", "a", "eu2")]  # in region, though not the idlest
    alone = [worker("a", 4, region="eu"), worker("us", 0, region="us")]
    assert plan(alone) == []  # its sessions are at home in eu
    assert plan(alone, params=RebalanceParams(keep_region=False)) == [Move("a-s0", "a", "us")]
    # a session placed away from its region (none had room there) goes home first
    sessions = {"a": [*placed("a", 3), SessionView("a-z", "m", "us")], "us": [], "eu2": []}
    homes = [worker("a", 4, region="eu"), worker("us", 0, region="us"), worker("eu2", 0)]
    assert plan(homes, sessions) == [Move("a-z", "a", "us")]
    # a session that asked for no region moves before one at home
    sessions = {"a": [*placed("a", 3), SessionView("a-z", "m", "")], "eu2": []}
    assert plan([worker("a", 4), worker("eu2", 0)], sessions) == [Move("a-z", "a", "eu2")]


def test_no_ping_pong_once_balanced_the_next_plan_is_empty() -> None:
    cases = [
        [worker("a", 4), worker("b", 0)],
        [worker("a", 4), worker("b", 0), worker("c", 0)],
        [worker("a", 8, capacity=8), worker("b", 0, capacity=2), worker("c", 1)],
        [worker("a", 3), worker("b", 0), worker("c", 0), worker("d", 0)],
    ]
    for workers in cases:
        active = overloaded(workers, (), MANY)
        moves = plan(workers, params=MANY, active=active)
        assert moves, workers
        after = applied(workers, moves)
        active = overloaded(after, active, MANY)
        # what moved may not move back (cooldown) - and nothing else moves either
        assert plan(after, params=MANY, active=active) == [], (workers, moves)
    # a move that would only swap the loads never happens, even in an episode
    assert plan([worker("a", 3), worker("b", 2)], active={"a"}) == []


def test_ties_are_broken_by_id_whatever_the_input_order() -> None:
    workers = [worker("c", 0), worker("a", 4), worker("b", 0), worker("z", 4)]
    sessions = {
        "a": [SessionView(s, "m", "eu") for s in ("a3", "a1", "a2")],
        "z": [SessionView(s, "m", "eu") for s in ("z2", "z1")],
    }
    expected = [Move("a1", "a", "b"), Move("z1", "z", "c")]
    assert plan(workers, sessions) == expected
    assert plan(list(reversed(workers)), sessions) == expected
    assert plan(workers, {k: list(reversed(v)) for k, v in sessions.items()}) == expected


def test_params_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        RebalanceParams(start_gap=0.1, stop_gap=0.2)
    with pytest.raises(InvalidArgument):
        RebalanceParams(max_per_worker=0)
    with pytest.raises(InvalidArgument):
        RebalanceParams(cooldown_s=-1.0)
