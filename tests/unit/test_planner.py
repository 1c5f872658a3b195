"""The capacity planner (windflow/ops): capacity per replica from a profile, integer
programs small enough to check by hand, spot derating, infeasible workloads naming the
binding constraint, malformed inputs naming field and line, profile versions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from windflow.ops import planner
from windflow.ops.profile import (
    Profile,
    ProfileVersionMismatch,
    check_version,
    find_profiles,
    load_profile,
)
from windflow.ops.workload import (
    Catalog,
    Demand,
    RegionOffer,
    WorkerClass,
    Workload,
    load_catalog,
    load_workload,
)
from windflow.ops.yamlio import SpecError

MODEL = "toy"


def make_profile(
    worker_class: str,
    batch_ms: dict[int, dict[int, float]],
    *,
    version: str = "v1",
    max_batch: int = 8,
    default_steps: int = 2,
    state_bytes: int = 1000,
) -> Profile:
    """A profile whose every sample of (steps, batch) is the given time: mean = p50 =
    p90, so capacities can be worked out by hand."""
    return Profile(
        model_id=MODEL,
        model_version=version,
        worker_class=worker_class,
        width=64,
        height=64,
        fps=10.0,
        steps=tuple(sorted(batch_ms)),
        default_steps=default_steps,
        max_batch=max_batch,
        batch_samples={s: {b: (ms,) * 3 for b, ms in by.items()} for s, by in batch_ms.items()},
        batch_mean={s: dict(by) for s, by in batch_ms.items()},
        encode_ms={"jpeg@64x64": 0.0, "jpeg@128x128": 0.5},
        encode_bytes={"jpeg@64x64": 1000, "jpeg@128x128": 3000},
        memory={"state_bytes": state_bytes, "ring_copies": 0, "buffered_frames": 0},
    )


# batch of 1/2/4/8 at 2 steps: 20/24/32/48 ms -> 6 ms a frame at 8; at 1 step half that
SLOW = {1: {1: 10.0, 2: 12.0, 4: 16.0, 8: 24.0}, 2: {1: 20.0, 2: 24.0, 4: 32.0, 8: 48.0}}
FAST = {s: {b: ms / 2 for b, ms in by.items()} for s, by in SLOW.items()}


def worker_class(
    name: str,
    price: float,
    *,
    spot: float | None = None,
    eviction: float = 0.0,
    regions: tuple[str, ...] = ("r1",),
    quota: int | None = None,
    memory_gb: float = 16.0,
) -> WorkerClass:
    return WorkerClass(
        name=name,
        memory_gb=memory_gb,
        price_per_hour=price,
        spot_price_per_hour=spot,
        eviction_rate=eviction,
        regions={r: RegionOffer(price, spot, quota) for r in regions},
    )


def demand(peak: int, **kw: object) -> Demand:
    fields: dict[str, object] = {
        "name": "d1",
        "model": MODEL,
        "region": "r1",
        "fps": 10.0,
        "latency_ms": 100.0,
        "peak_sessions": peak,
        "steps": 2,
        "min_steps": 2,
    }
    fields.update(kw)
    return Demand(**fields)  # type: ignore[arg-type]


def problem(
    demands: list[Demand],
    classes: list[WorkerClass],
    profiles: dict[str, Profile],
    *,
    max_spot_share: float = 1.0,
    version: str = "v1",
) -> planner.Problem:
    workload = Workload(Path("w.yaml"), tuple(demands), max_spot_share=max_spot_share)
    catalog = Catalog(Path("c.yaml"), tuple(classes))
    return planner.build_problem(
        workload,
        catalog,
        {(MODEL, name): p for name, p in profiles.items()},
        lambda d: version,
    )


def replicas(plan: planner.Plan) -> dict[tuple[str, int, bool], int]:
    return {
        (ln.option.worker_class.name, ln.option.steps, ln.spot): ln.replicas for ln in plan.lines
    }


# ---- capacity per replica ----


def test_capacity_comes_from_the_batching_curve_and_the_utilization_target() -> None:
    costs = make_profile("a", SLOW).costs()
    # 10 fps: n <= 8 share one batch, utilization 10 x batch_ms(n) / 1000; past 8, n x 10 x
    # 6 ms: 15 sessions = 0.90, 16 = 0.96. Latency of 15: a batch of 8 (48 ms) then one of
    # 7 (44 ms, interpolated) = 92 ms <= 100.
    cap = planner.replica_capacity(
        costs, costs, MODEL, 2, 10.0, 8, latency_ms=100.0, target_utilization=0.9
    )
    assert (cap.sessions, cap.limit) == (15, "utilization")
    assert cap.latency_ms == pytest.approx(92.0)
    assert cap.utilization == pytest.approx(0.9)
    # a tighter latency target binds first: 8 sessions = one batch of 48 ms
    cap = planner.replica_capacity(
        costs, costs, MODEL, 2, 10.0, 8, latency_ms=60.0, target_utilization=0.9
    )
    assert (cap.sessions, cap.limit) == (8, "latency")
    # memory: 5 sessions of 100 bytes in 500
    cap = planner.replica_capacity(
        costs,
        costs,
        MODEL,
        2,
        10.0,
        8,
        latency_ms=100.0,
        target_utilization=0.9,
        memory_bytes=500,
        session_bytes=100,
    )
    assert (cap.sessions, cap.limit) == (5, "memory")


def test_the_frame_interval_bounds_latency_even_under_a_loose_target() -> None:
    costs = make_profile("a", SLOW).costs()
    # 20 fps: 50 ms a frame; a batch of 4 takes 32 ms, of 5 ~36 ms (utilization 0.72)
    cap = planner.replica_capacity(
        costs, costs, MODEL, 2, 20.0, 8, latency_ms=1000.0, target_utilization=0.9
    )
    assert cap.limit in ("deadline", "utilization")
    assert cap.latency_ms <= 50.0


# ---- hand-checkable optima ----


def test_the_cheaper_class_per_session_wins() -> None:
    # class a: 15 sessions a replica at 1.0/h; class b (twice as fast): 30 at 1.5/h
    prob = problem(
        [demand(30)],
        [worker_class("a", 1.0), worker_class("b", 1.5)],
        {"a": make_profile("a", SLOW), "b": make_profile("b", FAST)},
    )
    sessions = {o.worker_class.name: o.sessions for o in prob.options}
    assert sessions == {"a": 15, "b": 30}
    plan = planner.solve(prob)
    assert plan.solver == "milp"
    assert replicas(plan) == {("b", 2, False): 1}
    assert plan.cost_per_hour == pytest.approx(1.5)
    # 31 sessions: b + a (2.5) beats b + b (3.0) and a x 3 (3.0)
    plan = planner.solve(problem([demand(31)], *_ab()))
    assert replicas(plan) == {("a", 2, False): 1, ("b", 2, False): 1}
    assert plan.cost_per_hour == pytest.approx(2.5)


def _ab() -> tuple[list[WorkerClass], dict[str, Profile]]:
    return (
        [worker_class("a", 1.0), worker_class("b", 1.5)],
        {"a": make_profile("a", SLOW), "b": make_profile("b", FAST)},
    )


def test_the_greedy_fallback_is_feasible_and_never_cheaper_than_the_optimum() -> None:
    for peak in (1, 14, 15, 16, 29, 31, 44, 60, 61):
        prob = problem([demand(peak)], *_ab())
        best = planner.solve_milp(prob)
        greedy = planner.solve_greedy(prob)
        assert best is not None and greedy is not None
        assert greedy.solver == "greedy"
        assert greedy.capacity(prob.demands[0]) >= peak
        assert greedy.cost_per_hour >= best.cost_per_hour - 1e-9
    assert planner.solve(problem([demand(31)], *_ab()), solver="greedy").solver == "greedy"


def test_lower_rungs_serve_more_and_a_full_quality_share_keeps_some_at_the_asked_rung() -> None:
    slow = make_profile("a", SLOW)
    # at 1 step a replica holds 30 sessions, but the climb threshold (0.75) caps the
    # asked rung (2 steps, above the floor of 1) at 12: 10 x 12 x 6 ms = 0.72
    prob = problem([demand(30, min_steps=1)], [worker_class("a", 1.0)], {"a": slow})
    sessions = {o.steps: o.sessions for o in prob.options}
    assert sessions == {2: 12, 1: 30}
    assert replicas(planner.solve(prob)) == {("a", 1, False): 1}
    # half of the peak at 2 steps: 2 replicas at 2 steps (24) + 1 at 1 step
    prob = problem(
        [demand(30, min_steps=1, full_quality_share=0.5)], [worker_class("a", 1.0)], {"a": slow}
    )
    plan = planner.solve(prob)
    assert replicas(plan) == {("a", 2, False): 2, ("a", 1, False): 1}
    assert plan.to_json()[0]["rung"] == 0


def test_spot_capacity_is_derated_by_its_eviction_rate() -> None:
    def plan_for(eviction: float, share: float = 1.0) -> dict[tuple[str, int, bool], int]:
        prob = problem(
            [demand(30)],
            [worker_class("a", 1.0, spot=0.3, eviction=eviction)],
            {"a": make_profile("a", SLOW)},
            max_spot_share=share,
        )
        return replicas(planner.solve(prob))

    # 15 sessions a replica; spot counts 15, 12, 7.5 of them
    assert plan_for(0.0) == {("a", 2, True): 2}  # 30 >= 30: 0.6/h
    assert plan_for(0.2) == {("a", 2, True): 3}  # 36 >= 30: 0.9/h
    assert plan_for(0.5) == {("a", 2, True): 4}  # 30 >= 30: 1.2/h
    # at most half on spot: 1 spot (12) + 2 on demand (30) would be 2.3; 2 on demand: 2.0
    assert plan_for(0.2, share=0.5) == {("a", 2, False): 2}
    assert plan_for(0.2, share=0.0) == {("a", 2, False): 2}


def test_quotas_push_capacity_to_the_next_class() -> None:
    prob = problem(
        [demand(60)],
        [worker_class("a", 1.0), worker_class("b", 1.5, quota=1)],
        {"a": make_profile("a", SLOW), "b": make_profile("b", FAST)},
    )
    plan = planner.solve(prob)
    assert replicas(plan) == {("b", 2, False): 1, ("a", 2, False): 2}
    assert plan.cost_per_hour == pytest.approx(3.5)


def test_naive_plan_is_one_session_per_replica_on_the_cheapest_class() -> None:
    prob = problem([demand(30)], *_ab())
    naive = planner.naive_plan(prob)
    assert naive is not None
    assert naive.cost_per_hour == pytest.approx(30 * 1.0)
    assert replicas(naive) == {("a", 2, False): 30}


def test_zero_peaks_give_an_empty_plan() -> None:
    plan = planner.solve(problem([demand(0)], *_ab()))
    assert plan.lines == [] and plan.cost_per_hour == 0.0


# ---- infeasible workloads name the binding constraint ----


def test_infeasible_latency() -> None:
    prob = problem([demand(10, latency_ms=5.0)], *_ab())
    with pytest.raises(planner.PlanInfeasible) as err:
        planner.solve(prob)
    message = err.value.message
    assert "latency" in message and "d1" in message
    assert "the fastest is 10.0 ms" in message and "(b, 2 steps" in message


def test_infeasible_quota() -> None:
    prob = problem([demand(40)], [worker_class("a", 1.0, quota=2)], {"a": make_profile("a", SLOW)})
    with pytest.raises(planner.PlanInfeasible) as err:
        planner.solve(prob)
    assert "quota: region r1 holds at most 30 sessions" in err.value.message
    assert "its peak is 40" in err.value.message
    # the greedy baseline says the same
    with pytest.raises(planner.PlanInfeasible, match="quota"):
        planner.solve(prob, solver="greedy")


def test_infeasible_without_a_profile_or_a_class_in_the_region() -> None:
    prob = problem([demand(5, model="wan2.1-causal")], *_ab())
    with pytest.raises(planner.PlanInfeasible) as err:
        planner.solve(prob)
    assert "no profile of model 'wan2.1-causal'" in err.value.message
    assert "waits for a GPU" in err.value.message
    prob = problem([demand(5, region="mars")], *_ab())
    with pytest.raises(planner.PlanInfeasible, match="region 'mars'"):
        planner.solve(prob)


def test_infeasible_quality_share() -> None:
    # 2 steps take 20 ms alone, 1 step 10 ms: a 15 ms target leaves only 1 step
    prob = problem(
        [demand(10, min_steps=1, latency_ms=15.0, full_quality_share=0.5)],
        [worker_class("a", 1.0)],
        {"a": make_profile("a", SLOW)},
    )
    with pytest.raises(planner.PlanInfeasible) as err:
        planner.solve(prob)
    assert "quality: full_quality_share 0.5 needs sessions at 2 steps" in err.value.message
    assert "20.0 ms on a" in err.value.message


def test_infeasible_memory() -> None:
    prob = problem(
        [demand(5)],
        [worker_class("a", 1.0, memory_gb=1.0)],
        {"a": make_profile("a", SLOW, state_bytes=2**31)},
    )
    with pytest.raises(planner.PlanInfeasible, match="memory: one session"):
        planner.solve(prob)


# ---- profile versions ----


def test_a_profile_of_another_model_version_is_refused_naming_both() -> None:
    profile = make_profile("a", SLOW, version="1.0+aaaa")
    check_version(profile, "1.0+aaaa")
    with pytest.raises(ProfileVersionMismatch) as err:
        check_version(profile, "1.0+bbbb")
    assert "1.0+aaaa" in err.value.message and "1.0+bbbb" in err.value.message
    with pytest.raises(ProfileVersionMismatch, match=r"1\.0\+bbbb"):
        problem([demand(5)], [worker_class("a", 1.0)], {"a": profile}, version="1.0+bbbb")


def _record(version: str = "v1") -> dict[str, object]:
    return {
        "format": 1,
        "model": {
            "id": MODEL,
            "version": version,
            "width": 64,
            "height": 64,
            "fps": 10.0,
            "steps": [1, 2],
            "default_steps": 2,
            "max_batch": 8,
        },
        "worker_class": "a",
        "batch_ms": {
            str(s): {str(b): {"samples": [ms, ms, ms], "mean": ms} for b, ms in by.items()}
            for s, by in SLOW.items()
        },
        "encode_ms": {"jpeg@64x64": {"p50": 0.0, "bytes": 1000}},
        "memory": {"state_bytes": 1000, "ring_copies": 2, "buffered_frames": 12},
    }


def test_profiles_load_from_disk(tmp_path: Path) -> None:
    (tmp_path / f"{MODEL}@a.json").write_text(json.dumps(_record()))
    found = find_profiles(tmp_path)
    profile = found[(MODEL, "a")]
    assert profile.model_version == "v1"
    assert profile.costs().batch_ms(MODEL, 2, 8) == pytest.approx(48.0)
    assert profile.session_bytes() == 1000 + 2 * 1000 + 12 * 1000
    # a profile under another file name, malformed JSON, a missing field
    (tmp_path / f"{MODEL}@a.json").rename(tmp_path / f"{MODEL}@b.json")
    with pytest.raises(SpecError, match=r"its name must be toy@a\.json"):
        find_profiles(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1,\n "model": }')
    with pytest.raises(SpecError, match=r"bad\.json line 2: not valid JSON"):
        load_profile(bad)
    record = _record()
    del record["worker_class"]
    bad.write_text(json.dumps(record))
    with pytest.raises(SpecError, match="worker_class: missing"):
        load_profile(bad)


def test_an_output_size_the_profile_did_not_measure_is_an_error() -> None:
    with pytest.raises(SpecError, match="no encoding figure for rgb@64x64"):
        problem([demand(5, format="rgb")], [worker_class("a", 1.0)], {"a": make_profile("a", SLOW)})


def test_larger_output_costs_its_encoding_per_frame() -> None:
    profile = make_profile("a", SLOW)
    assert profile.costs("jpeg", 128, 128).batch_ms(MODEL, 2, 8) == pytest.approx(48.0 + 8 * 0.5)


# ---- malformed workload and catalog: the field and the line ----

WORKLOAD = """\
catalog: catalog.yaml
demands:
  - model: windflow-world
    region: us-east
    fps: 24
    latency_ms: 40
    peak_sessions: 10
  - model: windflow-world
    region: eu-west
    fps: fast
    latency_ms: 40
    peak_sessions: 10
"""


def _workload_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "workload.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_workload(path)
    return err.value.message


def test_a_malformed_workload_names_the_field_and_the_line(tmp_path: Path) -> None:
    message = _workload_error(tmp_path, WORKLOAD)
    assert message.endswith("line 10: demands[1].fps: expected a number, got 'fast'")
    message = _workload_error(tmp_path, WORKLOAD.replace("fps: fast", "fsp: 24"))
    assert "line 10: demands[1].fsp: unknown field" in message
    message = _workload_error(tmp_path, WORKLOAD.replace("    fps: fast\n", ""))
    assert "line 8: demands[1].fps: missing (required)" in message
    message = _workload_error(tmp_path, WORKLOAD.replace("fps: fast", "fps: -3"))
    assert "line 10: demands[1].fps: must be more than 0, got -3" in message
    message = _workload_error(
        tmp_path, WORKLOAD.replace("peak_sessions: 10\n  - model", "peak_sessions: [1\n  - model")
    )
    assert "not valid YAML" in message
    text = WORKLOAD.replace("fps: fast", "fps: 24\n    trace: [1, 2]")
    message = _workload_error(tmp_path, text)
    assert "line 11: demands[1].trace: give peak_sessions or trace, not both" in message
    text = WORKLOAD.replace("fps: fast", "fps: 24").replace("eu-west", "us-east")
    message = _workload_error(tmp_path, text)
    assert "'windflow-world/us-east' is used twice (first on line 3)" in message


def test_a_good_workload_parses(tmp_path: Path) -> None:
    path = tmp_path / "workload.yaml"
    path.write_text(
        WORKLOAD.replace("fps: fast", "fps: 12").replace(
            "peak_sessions: 10\n  - model", "trace: [3, 9, 4]\n    min_steps: 1\n  - model"
        )
    )
    wl = load_workload(path)
    assert wl.catalog == tmp_path / "catalog.yaml"
    assert [d.peak_sessions for d in wl.demands] == [9, 10]
    assert wl.demands[0].trace == (3, 9, 4) and wl.demands[0].min_steps == 1
    assert wl.demands[1].fps == 12.0 and wl.demands[1].name == "windflow-world/eu-west"


CATALOG = """\
worker_classes:
  - name: cpu
    memory_gb: 8
    price_per_hour: 0.1
    spot: {price_per_hour: 0.03, eviction_rate: 0.05}
    regions:
      us-east: {}
      eu-west: {price_per_hour: 0.12, max_replicas: 4}
  - name: gpu
    memory_gb: 80
    price_per_hour: 3.9
    regions: [us-east]
"""


def test_catalogs_parse_and_their_errors_name_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG)
    catalog = load_catalog(path)
    cpu = catalog.by_name()["cpu"]
    assert cpu.regions["eu-west"] == RegionOffer(0.12, 0.03, 4)
    assert cpu.regions["us-east"] == RegionOffer(0.1, 0.03, None)
    assert [c.name for c in catalog.in_region("us-east")] == ["cpu", "gpu"]
    path.write_text(CATALOG.replace("price_per_hour: 3.9", "price: 3.9"))
    with pytest.raises(SpecError, match=r"line 11: worker_classes\[1\]\.price: unknown field"):
        load_catalog(path)
    path.write_text(CATALOG.replace("eviction_rate: 0.05", "eviction_rate: 1.5"))
    with pytest.raises(
        SpecError, match=r"line 5: worker_classes\[0\]\.spot\.eviction_rate: must be at most 1"
    ):
        load_catalog(path)
    path.write_text(CATALOG.replace("max_replicas: 4", "max_replicas: many"))
    with pytest.raises(
        SpecError,
        match=r"line 8: worker_classes\[0\]\.regions\.eu-west\.max_replicas: expected a whole",
    ):
        load_catalog(path)


def test_the_committed_examples_parse() -> None:
    root = Path(__file__).resolve().parents[2]
    wl = load_workload(root / "examples" / "workload.yaml")
    assert wl.catalog is not None
    catalog = load_catalog(wl.catalog)
    assert {d.region for d in wl.demands} >= {"us-east", "eu-west", "ap-south"}
    assert all(len(d.trace) == 24 for d in wl.demands)
    assert {"cpu-2core", "h100", "h200"} <= set(catalog.by_name())
    found = find_profiles(root / "profiles")
    assert ("windflow-world", "cpu-2core") in found
    assert math.isfinite(found[("windflow-world", "cpu-2core")].batch_mean[2][16])
