"""The capacity planner: replicas per (worker class, region, demand, quality rung) that
serve a workload's peak within its latency and quality targets at the lowest cost per
hour. docs/operations.md, "Planner", has the formulation.

1. **Capacity** (``replica_capacity``): how many sessions one replica of a class serves
   for a demand at a rung, from the class's profile of the model, with the worker's own
   cost model (``services.worker.costs.StepCosts`` seeded with the profile's batch
   times): the predicted utilization of the step thread (sessions of one model and step
   count share batches up to the max batch) at most the target (admission's rule, 0.9),
   the worst-case frame latency (every session due at once: full batches back to back,
   p90 batch times) within the latency target and the frame interval, and the sessions'
   memory within the class's.
2. **Integer program** (``solve_milp``: ``scipy.optimize.milp``, HiGHS): integer
   on-demand and spot replicas per option; minimize price; capacity >= peak per demand
   (spot counted at (1 - eviction rate)), a share of the peak at the asked rung, a cap on
   the spot share, quotas per (class, region). ``solve_greedy``: cheapest cost per session
   first, the fallback.
3. **Diagnosis** (``diagnose``): when no plan exists, which constraint binds and where.
4. **Baselines**: one session per replica (``naive_plan``: what StreamWise and FlashDreams
   plan) and the batched plan at full quality on demand only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from services.worker.costs import Demand as CostDemand
from services.worker.costs import StepCosts
from services.worker.scheduler import QualityParams
from windflow.errors import FailedPrecondition
from windflow.ops.profile import Profile, check_version
from windflow.ops.workload import Catalog, Demand, WorkerClass, Workload
from windflow.ops.yamlio import SpecError

MAX_SESSIONS_PER_REPLICA = 4096
MEMORY_USABLE = 0.9
"""Share of a class's memory sessions may use (the rest: the OS, the worker, the model)."""
CLIMB_UTILIZATION = QualityParams().up_utilization
"""A replica whose sessions may step down (a rung above their floor) is planned to at most
this utilization: the quality governor lets a session climb back only while the predicted
utilization after its climb stays at or below it, so a replica planned above it keeps a
session that a transient stepped down at the lower rung for good."""
LATENCY_STATISTIC = "p90"
UTILIZATION_STATISTIC = "mean"


class PlanInfeasible(FailedPrecondition):
    """No plan meets the workload; the message names the binding constraint."""


@dataclass(frozen=True, slots=True)
class Capacity:
    sessions: int
    """Sessions one replica serves (0: not even one)."""
    limit: str
    """What stops one more: utilization, latency, deadline, memory, cap."""
    latency_ms: float
    """Worst-case frame latency at ``sessions`` (batch times at p90)."""
    utilization: float
    """Predicted step-thread utilization at ``sessions`` (mean batch times)."""
    single_latency_ms: float
    """Latency of one session alone (its batch of 1)."""


def replica_capacity(
    costs: StepCosts,
    latency_costs: StepCosts,
    model_id: str,
    steps: int,
    fps: float,
    max_batch: int,
    *,
    latency_ms: float,
    target_utilization: float,
    memory_bytes: float = math.inf,
    session_bytes: int = 0,
) -> Capacity:
    """Sessions of (model, steps, fps) one replica serves; see the module docstring."""
    interval_ms = 1000.0 / fps
    bound = min(latency_ms, interval_ms)
    size = max(1, max_batch)

    def latency(n: int) -> float:
        full, rest = divmod(n, size)
        total = full * (latency_costs.batch_ms(model_id, steps, size) or math.inf)
        if rest:
            total += latency_costs.batch_ms(model_id, steps, rest) or math.inf
        return total

    def utilization(n: int) -> float:
        u = costs.utilization([CostDemand(model_id, steps, fps)] * n, {model_id: size})
        return math.inf if u is None else u

    single = latency(1)
    best, limit = 0, "cap"
    for n in range(1, MAX_SESSIONS_PER_REPLICA + 1):
        if n * session_bytes > memory_bytes:
            limit = "memory"
        elif latency(n) > latency_ms:
            limit = "latency"
        elif latency(n) > bound:
            limit = "deadline"
        elif utilization(n) > target_utilization + 1e-12:
            limit = "utilization"
        else:
            best = n
            continue
        break
    return Capacity(
        best,
        limit,
        latency(best) if best else single,
        utilization(best) if best else utilization(1),
        single,
    )


@dataclass(frozen=True, slots=True)
class Option:
    """Replicas of one worker class in one region serving one demand at one rung."""

    demand: Demand
    worker_class: WorkerClass
    region: str
    steps: int
    rung: int
    """0: the steps the demand asks for; 1, 2, ...: each lower rung of the ladder."""
    capacity: Capacity
    price: float
    spot_price: float | None
    quota: int | None

    @property
    def sessions(self) -> int:
        return self.capacity.sessions

    @property
    def spot_sessions(self) -> float:
        """Derated: a spot replica counts (1 - eviction rate) of its sessions."""
        return self.sessions * (1.0 - self.worker_class.eviction_rate)


@dataclass(frozen=True, slots=True)
class PlanLine:
    option: Option
    replicas: int
    spot: bool

    @property
    def cost_per_hour(self) -> float:
        price = self.option.spot_price if self.spot else self.option.price
        return self.replicas * (price or 0.0)

    @property
    def capacity(self) -> float:
        per = self.option.spot_sessions if self.spot else self.option.sessions
        return self.replicas * per

    def to_json(self) -> dict[str, Any]:
        o = self.option
        return {
            "worker_class": o.worker_class.name,
            "region": o.region,
            "model": o.demand.model,
            "demand": o.demand.name,
            "rung": o.rung,
            "steps": o.steps,
            "fps": o.demand.fps,
            "replicas": self.replicas,
            "spot": self.spot,
            "sessions_per_replica": o.sessions,
            "price_per_hour": o.spot_price if self.spot else o.price,
            "latency_ms_bound": round(o.capacity.latency_ms, 2),
            "utilization": round(o.capacity.utilization, 3),
        }


@dataclass(slots=True)
class Plan:
    lines: list[PlanLine]
    solver: str
    solve_ms: float
    status: str = ""

    @property
    def cost_per_hour(self) -> float:
        return sum(line.cost_per_hour for line in self.lines)

    def capacity(self, demand: Demand) -> float:
        return sum(line.capacity for line in self.lines if line.option.demand == demand)

    def to_json(self) -> list[dict[str, Any]]:
        return [line.to_json() for line in self.lines]


@dataclass(frozen=True, slots=True)
class Rejected:
    """An option that cannot serve even one session."""

    demand: Demand
    worker_class: WorkerClass
    region: str
    steps: int
    capacity: Capacity


@dataclass(slots=True)
class Problem:
    """The planner's input, resolved: demands with their steps filled in, the options."""

    workload: Workload
    demands: list[Demand]
    options: list[Option]
    profiles: dict[tuple[str, str], Profile]
    catalog: Catalog
    rejected: list[Rejected] = field(default_factory=list)
    """Options that cannot serve one session, and why."""
    unprofiled: dict[str, list[str]] = field(default_factory=dict)
    """Worker class -> models with a demand in one of its regions but no profile there."""

    def options_of(self, demand: Demand) -> list[Option]:
        return [o for o in self.options if o.demand == demand]


def _ladder(demand: Demand, profile: Profile) -> tuple[int, int, list[int]]:
    steps = demand.steps or profile.default_steps
    if steps not in profile.steps:
        raise SpecError(
            f"{demand.where()}: steps: {steps} is not on {demand.model}'s step ladder "
            f"({', '.join(map(str, profile.steps))})"
        )
    floor = demand.min_steps or steps
    if floor not in profile.steps:
        raise SpecError(
            f"{demand.where()}: min_steps: {floor} is not on {demand.model}'s step ladder "
            f"({', '.join(map(str, profile.steps))})"
        )
    rungs = sorted((k for k in profile.steps if floor <= k <= steps), reverse=True)
    return steps, floor, rungs


def build_problem(
    workload: Workload,
    catalog: Catalog,
    profiles: Mapping[tuple[str, str], Profile],
    version_of: Callable[[Demand], str],
) -> Problem:
    """Resolve the workload against the catalog and the profiles: every (class, region,
    demand, rung) option with its capacity per replica. Raises ``SpecError`` (a demand's
    steps off the ladder, an output size not profiled) and ``ProfileVersionMismatch``."""
    demands: list[Demand] = []
    options: list[Option] = []
    rejected: list[Rejected] = []
    unprofiled: dict[str, list[str]] = {}
    for demand in workload.demands:
        offered = catalog.in_region(demand.region)
        found = [
            (wc, profiles[(demand.model, wc.name)])
            for wc in offered
            if (demand.model, wc.name) in profiles
        ]
        for wc in offered:
            if (demand.model, wc.name) not in profiles:
                models = unprofiled.setdefault(wc.name, [])
                if demand.model not in models:
                    models.append(demand.model)
        if found:
            version = version_of(demand)
            for _, profile in found:
                check_version(profile, version)
            steps, floor, _ = _ladder(demand, found[0][1])
            demand = replace(demand, steps=steps, min_steps=floor)
        demands.append(demand)
        for wc, profile in found:
            _, _, rungs = _ladder(demand, profile)
            costs = profile.costs(
                demand.format, demand.width, demand.height, statistic=UTILIZATION_STATISTIC
            )
            latency_costs = profile.costs(
                demand.format, demand.width, demand.height, statistic=LATENCY_STATISTIC
            )
            offer = wc.regions[demand.region]
            memory = wc.memory_gb * 2**30 * MEMORY_USABLE - profile.memory.get("model_rss_bytes", 0)
            session_bytes = profile.session_bytes(demand.format, demand.width, demand.height)
            for rung, k in enumerate(rungs):
                cap = replica_capacity(
                    costs,
                    latency_costs,
                    demand.model,
                    k,
                    demand.fps,
                    profile.max_batch,
                    latency_ms=demand.latency_ms,
                    target_utilization=workload.target_utilization
                    if k == demand.min_steps
                    else min(workload.target_utilization, CLIMB_UTILIZATION),
                    memory_bytes=memory,
                    session_bytes=session_bytes,
                )
                if cap.sessions < 1:
                    rejected.append(Rejected(demand, wc, demand.region, k, cap))
                    continue
                options.append(
                    Option(
                        demand,
                        wc,
                        demand.region,
                        k,
                        rung,
                        cap,
                        offer.price_per_hour,
                        offer.spot_price_per_hour,
                        offer.max_replicas,
                    )
                )
    return Problem(workload, demands, options, dict(profiles), catalog, rejected, unprofiled)


# ---- solving ----


@dataclass(frozen=True, slots=True)
class _Var:
    option: Option
    spot: bool

    @property
    def price(self) -> float:
        return (self.option.spot_price if self.spot else self.option.price) or 0.0

    @property
    def sessions(self) -> float:
        return self.option.spot_sessions if self.spot else float(self.option.sessions)


def _variables(
    problem: Problem, *, spot: bool = True, full_quality_only: bool = False
) -> list[_Var]:
    out = []
    for o in problem.options:
        if full_quality_only and o.rung != 0:
            continue
        out.append(_Var(o, False))
        if spot and o.spot_price is not None and problem.workload.max_spot_share > 0:
            out.append(_Var(o, True))
    return out


def _peaks(problem: Problem, peaks: Mapping[str, int] | None) -> dict[str, int]:
    return {d.name: (peaks or {}).get(d.name, d.peak_sessions) for d in problem.demands}


def solve_milp(
    problem: Problem,
    *,
    peaks: Mapping[str, int] | None = None,
    spot: bool = True,
    full_quality_only: bool = False,
    time_limit_s: float = 10.0,
) -> Plan | None:
    """The optimum by ``scipy.optimize.milp`` (HiGHS); None when the solver finds no
    feasible plan (``diagnose`` says why) or is not installed."""
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        return None
    t0 = time.perf_counter()
    want = _peaks(problem, peaks)
    variables = _variables(problem, spot=spot, full_quality_only=full_quality_only)
    if not variables:
        return None if any(want.values()) else Plan([], "milp", 0.0, "empty")
    n = len(variables)
    rows: list[np.ndarray] = []
    lower: list[float] = []
    upper: list[float] = []

    def row(coeffs: Mapping[int, float], lo: float, hi: float) -> None:
        r = np.zeros(n)
        for i, v in coeffs.items():
            r[i] = v
        rows.append(r)
        lower.append(lo)
        upper.append(hi)

    share_spot = problem.workload.max_spot_share
    for d in problem.demands:
        mine = [i for i, v in enumerate(variables) if v.option.demand == d]
        row({i: variables[i].sessions for i in mine}, want[d.name], math.inf)
        if d.full_quality_share > 0 and not full_quality_only:
            full = [i for i in mine if variables[i].option.rung == 0]
            row(
                {i: variables[i].sessions for i in full},
                d.full_quality_share * want[d.name],
                math.inf,
            )
        spots = [i for i in mine if variables[i].spot]
        if spots and share_spot < 1.0:
            row({i: variables[i].sessions for i in spots}, -math.inf, share_spot * want[d.name])
    for (cls, region), quota in _quotas(problem).items():
        mine = [
            i
            for i, v in enumerate(variables)
            if v.option.worker_class.name == cls and v.option.region == region
        ]
        if mine:
            row(dict.fromkeys(mine, 1.0), -math.inf, quota)
    cost = np.array([v.price for v in variables])
    # a tie between equal-cost plans goes to the one with more capacity (more headroom)
    cost = cost - 1e-7 * np.array([v.sessions for v in variables])
    res = milp(
        cost,
        integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), np.full(n, np.inf)),
        constraints=LinearConstraint(np.vstack(rows), np.array(lower), np.array(upper)),
        options={"time_limit": time_limit_s, "disp": False},
    )
    ms = (time.perf_counter() - t0) * 1000.0
    if res.x is None or res.status not in (0, 1):
        return None
    counts = np.round(res.x).astype(int)
    lines = [
        PlanLine(v.option, int(c), v.spot) for v, c in zip(variables, counts, strict=True) if c > 0
    ]
    return Plan(_ordered(lines), "milp", ms, "optimal" if res.status == 0 else "time limit")


def _quotas(problem: Problem) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for o in problem.options:
        if o.quota is not None:
            out[(o.worker_class.name, o.region)] = o.quota
    return out


def _ordered(lines: list[PlanLine]) -> list[PlanLine]:
    return sorted(
        lines,
        key=lambda ln: (
            ln.option.demand.name,
            ln.option.rung,
            ln.option.worker_class.name,
            ln.spot,
        ),
    )


def solve_greedy(
    problem: Problem,
    *,
    peaks: Mapping[str, int] | None = None,
    spot: bool = True,
    full_quality_only: bool = False,
) -> Plan | None:
    """Cheapest cost per session first, demand by demand (the full-quality share first),
    respecting quotas and the spot cap; a last partial replica goes to the cheapest
    replica that covers what is left. None when it cannot cover a demand."""
    t0 = time.perf_counter()
    want = _peaks(problem, peaks)
    variables = _variables(problem, spot=spot, full_quality_only=full_quality_only)
    quota_left = dict(_quotas(problem))
    chosen: dict[int, int] = {}
    """variable index -> replicas."""
    share_spot = problem.workload.max_spot_share

    def key(v: _Var) -> tuple[str, str]:
        return (v.option.worker_class.name, v.option.region)

    for d in problem.demands:
        mine = [i for i, v in enumerate(variables) if v.option.demand == d]
        spot_left = share_spot * want[d.name]
        stages = []
        if d.full_quality_share > 0 and not full_quality_only:
            stages.append(
                ([i for i in mine if variables[i].option.rung == 0], d.full_quality_share)
            )
        stages.append((mine, 1.0))
        covered = 0.0
        for pool, share in stages:
            need = share * want[d.name] - covered
            while need > 1e-9:

                def room(v: _Var, spot_left: float) -> int:
                    left = quota_left.get(key(v))
                    by_quota = math.inf if left is None else left
                    by_spot = math.floor((spot_left + 1e-9) / v.sessions) if v.spot else math.inf
                    return int(min(by_quota, by_spot, 10**9))

                usable = [
                    i
                    for i in pool
                    if room(variables[i], spot_left) > 0 and variables[i].sessions > 0
                ]
                if not usable:
                    return None
                pick = min(
                    usable,
                    key=lambda i: (
                        variables[i].price / variables[i].sessions,
                        -variables[i].sessions,
                    ),
                )
                best = variables[pick]
                take = min(math.floor(need / best.sessions), room(best, spot_left))
                if take == 0:  # less than one replica of the best is left to cover
                    whole = [i for i in usable if variables[i].sessions >= need]
                    pick = min(
                        whole or usable, key=lambda i: (variables[i].price, -variables[i].sessions)
                    )
                    best = variables[pick]
                    take = 1
                chosen[pick] = chosen.get(pick, 0) + take
                k = key(best)
                if k in quota_left:
                    quota_left[k] -= take
                if best.spot:
                    spot_left -= take * best.sessions
                covered += take * best.sessions
                need -= take * best.sessions
    lines = [PlanLine(variables[i].option, c, variables[i].spot) for i, c in chosen.items() if c]
    return Plan(_ordered(lines), "greedy", (time.perf_counter() - t0) * 1000.0, "heuristic")


def solve(problem: Problem, *, solver: str = "milp", **kwargs: Any) -> Plan:
    """The plan, or ``PlanInfeasible`` naming the binding constraint. ``solver``: milp
    (greedy when scipy is missing or HiGHS returns nothing) or greedy."""
    plan = solve_milp(problem, **kwargs) if solver == "milp" else None
    if plan is None:
        greedy_kwargs = {k: v for k, v in kwargs.items() if k != "time_limit_s"}
        plan = solve_greedy(problem, **greedy_kwargs)
    if plan is None:
        raise PlanInfeasible(diagnose(problem, peaks=kwargs.get("peaks")))
    return plan


# ---- why no plan ----


def _steps_text(d: Demand) -> str:
    return f"{d.steps} steps" if d.min_steps == d.steps else f"{d.min_steps}-{d.steps} steps"


def _fmt_classes(classes: Sequence[WorkerClass]) -> str:
    return ", ".join(c.name for c in classes) or "none"


def diagnose(problem: Problem, *, peaks: Mapping[str, int] | None = None) -> str:
    """Which constraint binds, and for which demand: the first that explains it."""
    want = _peaks(problem, peaks)
    catalog = problem.catalog
    for d in problem.demands:
        if want[d.name] == 0:
            continue
        offered = catalog.in_region(d.region)
        if not offered:
            regions = sorted({r for c in catalog.classes for r in c.regions})
            return (
                f"{d.where()}: region: no worker class of the catalog ({catalog.path}) is "
                f"offered in region {d.region!r} (regions there: {', '.join(regions)})"
            )
        profiled = [c for c in offered if (d.model, c.name) in problem.profiles]
        if not profiled:
            have = sorted(f"{m}@{c}" for m, c in problem.profiles) or ["none"]
            return (
                f"{d.where()}: profile: no profile of model {d.model!r} on any worker class "
                f"offered in region {d.region} ({_fmt_classes(offered)}); profiles found: "
                f"{', '.join(have)}. Measure one with `windflow profile --model {d.model}` "
                "on such a machine (a GPU model's profile waits for a GPU)"
            )
        mine = problem.options_of(d)
        if not mine:
            rejected = [r for r in problem.rejected if r.demand == d]
            fastest = min(rejected, key=lambda r: r.capacity.single_latency_ms)
            wc, steps, cap = fastest.worker_class, fastest.steps, fastest.capacity
            if all(r.capacity.limit == "memory" for r in rejected):
                return (
                    f"{d.where()}: memory: one session of {d.model} does not fit the memory of "
                    f"any class in {d.region} ({_fmt_classes(profiled)})"
                )
            bound = min(d.latency_ms, 1000.0 / d.fps)
            what = (
                f"latency_ms {d.latency_ms:g}"
                if d.latency_ms <= 1000.0 / d.fps
                else f"the frame interval ({1000.0 / d.fps:.1f} ms at {d.fps:g} fps)"
            )
            return (
                f"{d.where()}: latency: no worker class in {d.region} meets {what} for "
                f"{d.model} at {_steps_text(d)}: the fastest is "
                f"{cap.single_latency_ms:.1f} ms for one session alone ({wc.name}, {steps} "
                f"steps, batch p90) > {bound:.1f} ms"
            )
        if d.full_quality_share > 0 and not any(o.rung == 0 for o in mine):
            top = min(
                (r for r in problem.rejected if r.demand == d and r.steps == d.steps),
                key=lambda r: r.capacity.single_latency_ms,
                default=None,
            )
            detail = (
                f" (the fastest: {top.capacity.single_latency_ms:.1f} ms on "
                f"{top.worker_class.name})"
                if top
                else ""
            )
            return (
                f"{d.where()}: quality: full_quality_share {d.full_quality_share:g} needs "
                f"sessions at {d.steps} steps, but no class in {d.region} meets latency_ms "
                f"{d.latency_ms:g} there{detail}"
            )
    quotas = _quotas(problem)
    for d in problem.demands:
        most = _most_sessions(problem, d, quotas)
        if most + 1e-9 < want[d.name]:
            limits = ", ".join(
                f"{c} <= {q} replicas" for (c, r), q in sorted(quotas.items()) if r == d.region
            )
            return (
                f"{d.where()}: quota: region {d.region} holds at most {math.floor(most)} "
                f"sessions of it within its quotas ({limits}), its peak is {want[d.name]}"
            )
        if d.full_quality_share > 0:
            full = _most_sessions(problem, d, quotas, rung0=True)
            if full + 1e-9 < d.full_quality_share * want[d.name]:
                return (
                    f"{d.where()}: quality: at {d.steps} steps region {d.region} holds at "
                    f"most {math.floor(full)} sessions within its quotas, "
                    f"full_quality_share {d.full_quality_share:g} of {want[d.name]} needs "
                    f"{math.ceil(d.full_quality_share * want[d.name])}"
                )
    regions = sorted({d.region for d in problem.demands})
    for region in regions:
        group = [d for d in problem.demands if d.region == region]
        if len(group) > 1 and any((c, region) in quotas for c, _ in quotas):
            return (
                f"quota: the quotas of region {region} cannot hold the peaks of its demands "
                f"together ({', '.join(d.name for d in group)}), though each fits alone"
            )
    return "the solver found no plan (no single constraint explains it)"


def _most_sessions(
    problem: Problem, d: Demand, quotas: Mapping[tuple[str, str], int], *, rung0: bool = False
) -> float:
    total = 0.0
    for (cls, region), quota in list(quotas.items()) + [
        ((o.worker_class.name, o.region), -1)
        for o in problem.options_of(d)
        if (o.worker_class.name, o.region) not in quotas
    ]:
        mine = [
            o
            for o in problem.options_of(d)
            if o.worker_class.name == cls and o.region == region and (o.rung == 0 or not rung0)
        ]
        if not mine:
            continue
        if quota < 0:
            return math.inf
        best = max(
            max(o.sessions, o.spot_sessions if o.spot_price is not None else 0) for o in mine
        )
        total += quota * best
    return total


# ---- baselines ----


def naive_plan(problem: Problem, peaks: Mapping[str, int] | None = None) -> Plan | None:
    """One session per replica (StreamWise and FlashDreams plan one request per
    instance): per demand, its peak in replicas of the cheapest class whose batch of one
    meets the latency target, on demand, at the asked steps (the lowest acceptable if
    none meets it there); None when a demand has no such class."""
    want = _peaks(problem, peaks)
    lines = []
    for d in problem.demands:
        if want[d.name] == 0:
            continue
        mine = problem.options_of(d)
        if not mine:
            return None
        best_rung = min(o.rung for o in mine)
        cheapest = min((o for o in mine if o.rung == best_rung), key=lambda o: o.price)
        lines.append(
            PlanLine(
                replace(cheapest, capacity=replace(cheapest.capacity, sessions=1)),
                want[d.name],
                False,
            )
        )
    return Plan(lines, "one session per replica", 0.0)
