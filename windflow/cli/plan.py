"""``windflow plan``: the replicas a workload needs, at the lowest cost per hour.

    windflow plan examples/workload.yaml [--catalog CATALOG.yaml] [--profiles profiles]
                  [--solver milp|greedy] [--sim-seconds S] [--no-simulate] [--json]
                  [--emit-k8s DIR]

Reads the workload (demands per model and region: peak or hourly trace of concurrent
sessions, fps, latency target, lowest acceptable rung), the catalog of worker classes
(prices, spot prices and eviction rates, regions, quotas) and the profiles
(``windflow profile``), solves the integer program for replicas per (worker class,
region, demand, rung), compares it with one session per replica, and checks it by
simulation through the runtime's scheduler, quality and admission cores
(docs/operations.md, "Planner"). A table goes to stdout (stderr with ``--json``, which
ends stdout with one JSON line and writes nothing else there). Exit 2: bad input; 3: no
plan meets the workload (the message names the binding constraint).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from windflow.errors import WindflowError
from windflow.ops import planner
from windflow.ops.profile import PROFILE_DIR, Profile, find_profiles
from windflow.ops.workload import Demand, load_catalog, load_workload
from windflow.ops.yamlio import SpecError


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "plan", help="plan replicas for a workload at the lowest cost", description=__doc__
    )
    parser.add_argument("workload", help="the workload YAML (examples/workload.yaml)")
    parser.add_argument("--catalog", default=None, help="worker classes (default: the workload's)")
    parser.add_argument("--profiles", default=str(PROFILE_DIR), help="profiles directory")
    parser.add_argument("--solver", choices=("milp", "greedy"), default="milp")
    parser.add_argument("--sim-seconds", type=float, default=None, help="simulated time")
    parser.add_argument("--seed", type=int, default=None, help="the simulation's seed")
    parser.add_argument("--no-simulate", action="store_true", help="skip the simulation")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    parser.add_argument(
        "--emit-k8s",
        default=None,
        metavar="DIR",
        help="write a Kubernetes overlay of the plan there (windflow.ops.k8s)",
    )
    parser.set_defaults(func=run)


def _versions() -> Any:
    """The version of each model to plan for: the demand's own ``version``, else the one
    the registry loads here (cached)."""
    cache: dict[str, str] = {}

    def version_of(demand: Demand) -> str:
        if demand.version:
            return demand.version
        if demand.model not in cache:
            from services.worker.models.registry import load_model

            try:
                cache[demand.model] = load_model(demand.model).info.version
            except Exception as exc:  # a checkpoint path missing, an unknown model...
                raise SpecError(
                    f"{demand.where()}: version: cannot tell which version of {demand.model} "
                    f"to plan for (loading it here failed: {exc}); give `version:` in the "
                    "demand"
                ) from None
        return cache[demand.model]

    return version_of


def headroom(plan: planner.Plan, demands: list[Demand]) -> dict[str, dict[str, Any]]:
    out = {}
    for d in demands:
        capacity = plan.capacity(d)
        out[d.name] = {
            "peak": d.peak_sessions,
            "capacity": round(capacity, 2),
            "spare_sessions": round(capacity - d.peak_sessions, 2),
            "spare_share": round((capacity - d.peak_sessions) / d.peak_sessions, 4)
            if d.peak_sessions
            else None,
        }
    return out


def daily(problem: planner.Problem, solver: str, peak_cost: float) -> dict[str, Any] | None:
    """Cost over the traces' hours: the peak plan all day against a plan per hour."""
    traced = [d for d in problem.demands if d.trace]
    if not traced:
        return None
    hours = max(len(d.trace) for d in traced)
    per_hour = []
    for h in range(hours):
        peaks = {
            d.name: (d.trace[h % len(d.trace)] if d.trace else d.peak_sessions)
            for d in problem.demands
        }
        plan = planner.solve(problem, solver=solver, peaks=peaks)
        per_hour.append(round(plan.cost_per_hour, 4))
    return {
        "hours": hours,
        "fixed_at_peak": round(peak_cost * hours, 4),
        "scaled_by_hour": round(sum(per_hour), 4),
        "cost_by_hour": per_hour,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'demand':<14} {'class':<10} {'region':<9} {'rung':>4} {'steps':>5} {'fps':>5} "
        f"{'replicas':>8} {'spot':>5} {'sess/rep':>8} {'$/h':>8}"
    ]
    for p in result["plan"]:
        lines.append(
            f"{p['demand']:<14} {p['worker_class']:<10} {p['region']:<9} {p['rung']:>4} "
            f"{p['steps']:>5} {p['fps']:>5g} {p['replicas']:>8} "
            f"{('yes' if p['spot'] else 'no'):>5} "
            f"{p['sessions_per_replica']:>8} {p['replicas'] * p['price_per_hour']:>8.3f}"
        )
    lines.append(
        f"cost {result['cost_per_hour']:.3f} $/h ({result['solver']}, "
        f"{result['solve_ms']:.1f} ms); "
        f"one session per replica {result['naive_cost_per_hour']} $/h; savings "
        f"{result['savings_ratio']}; batched at full quality on demand "
        f"{result['batched_full_quality_cost_per_hour']} $/h"
    )
    for name, h in result["headroom"].items():
        lines.append(
            f"  {name}: peak {h['peak']}, capacity {h['capacity']}, spare {h['spare_sessions']}"
        )
    if result.get("daily"):
        d = result["daily"]
        lines.append(
            f"over {d['hours']} h: {d['fixed_at_peak']} $ at the peak plan, "
            f"{d['scaled_by_hour']} $ re-planned each hour"
        )
    sim = result.get("simulation")
    if sim:
        lines.append(
            f"simulated {sim['simulated_s']:g} s at the peak: deadline attainment "
            f"{sim['deadline_attainment']}, refusals {sim['refusals']}, admitted "
            f"{sim['admitted']}, latency p50/p99 {sim['latency_ms_p50']}/{sim['latency_ms_p99']} "
            f"ms, quality changes {sim['quality_changes']} ({sim['wall_ms']:.0f} ms)"
        )
    for cls, models in result.get("unprofiled", {}).items():
        lines.append(f"not plannable: {cls} has no profile of {', '.join(models)}")
    return "\n".join(lines)


def plan_workload(args: argparse.Namespace) -> dict[str, Any]:
    workload = load_workload(Path(args.workload))
    catalog_path = Path(args.catalog) if args.catalog else workload.catalog
    if catalog_path is None:
        raise SpecError(
            f"{workload.path} line 1: catalog: missing (give `catalog:` in the workload or "
            "--catalog)"
        )
    catalog = load_catalog(catalog_path)
    profiles: dict[tuple[str, str], Profile] = find_profiles(Path(args.profiles))
    problem = planner.build_problem(workload, catalog, profiles, _versions())
    plan = planner.solve(problem, solver=args.solver)
    naive = planner.naive_plan(problem)
    full = planner.solve_milp(problem, spot=False, full_quality_only=True)
    if full is None and args.solver == "greedy":
        full = planner.solve_greedy(problem, spot=False, full_quality_only=True)
    cost = plan.cost_per_hour
    naive_cost = naive.cost_per_hour if naive else None
    result: dict[str, Any] = {
        "workload": str(workload.path),
        "catalog": str(catalog.path),
        "plan": plan.to_json(),
        "cost_per_hour": round(cost, 4),
        "naive_cost_per_hour": round(naive_cost, 4) if naive_cost is not None else None,
        "savings_ratio": round(1.0 - cost / naive_cost, 4) if naive_cost else None,
        "batched_full_quality_cost_per_hour": round(full.cost_per_hour, 4) if full else None,
        "headroom": headroom(plan, problem.demands),
        "solve_ms": round(plan.solve_ms, 2),
        "solver": plan.solver,
        "status": plan.status,
        "profiles": [
            {
                "path": str(p.path),
                "version": p.model_version,
                "commit": (p.revision or {}).get("commit"),
                "measured_at": p.measured_at,
            }
            for key, p in sorted(profiles.items())
            if any(
                o.demand.model == key[0] and o.worker_class.name == key[1] for o in problem.options
            )
        ],
        "unprofiled": problem.unprofiled,
        "daily": daily(problem, args.solver, cost),
    }
    if not args.no_simulate:
        from windflow.ops.simulate import simulate

        sim = workload.simulation
        outcome = simulate(
            plan,
            problem.demands,
            profiles,
            seconds=args.sim_seconds if args.sim_seconds is not None else sim.seconds,
            seed=args.seed if args.seed is not None else sim.seed,
            ramp_s=sim.ramp_s,
            target_utilization=workload.target_utilization,
        )
        result["simulated_deadline_attainment"] = round(outcome.deadline_attainment, 5)
        result["simulated_refusals"] = outcome.refusals
        result["simulation"] = outcome.to_json()
    else:
        result["simulated_deadline_attainment"] = None
        result["simulated_refusals"] = None
    if args.emit_k8s:
        result["k8s"] = [str(p) for p in _emit_k8s(result["plan"], Path(args.emit_k8s))]
    return result


def _emit_k8s(plan: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The plan as a kustomize overlay (windflow/ops/k8s.py, docs/operations.md,
    "Kubernetes"); imported only when asked for."""
    from windflow.ops import k8s

    try:
        return k8s.write_overlay(plan, out_dir)
    except FileNotFoundError as exc:  # an installed package has no deploy/k8s base
        raise SpecError(f"--emit-k8s: {exc}") from None


def run(args: argparse.Namespace) -> int:
    try:
        result = plan_workload(args)
    except planner.PlanInfeasible as exc:
        print(f"windflow plan: infeasible: {exc.message}", file=sys.stderr)
        return 3
    except WindflowError as exc:
        print(f"windflow plan: {exc.message}", file=sys.stderr)
        return 2
    out: TextIO = sys.stderr if args.json else sys.stdout
    print(table(result), file=out, flush=True)
    if args.json:
        print(json.dumps(result, default=_plain), flush=True)
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
