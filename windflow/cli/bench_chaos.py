"""``windflow bench chaos``: random seeded schedules of sessions, controls and faults played
against a real stack, every client's history checked (``windflow.chaos``).

Schedule i of ``--seed S`` is the schedule of seed S + i, each on a fresh stack; a failing
one prints its schedule and the command that plays it again (``--seed S+i --schedules 1``).
Runs ``--schedules`` schedules, or as many as fit in ``--minutes`` (with both: whichever
ends first); then, unless ``--no-recovery``, the recovery phase (a worker holding 16
streaming sessions killed: ``recovery_all_ms``). Progress goes to stderr; the summary to
stdout, with ``--json`` its last line one JSON object. Exits 1 when a rule was broken or a
session lost. A failing schedule's stack logs are kept (the path is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.worker.models.registry import DEFAULT_MODEL
from windflow.chaos import schedule as schedules
from windflow.chaos.history import Violation
from windflow.chaos.recovery import RecoveryResult, recovery_all
from windflow.chaos.runner import ScheduleResult, play_schedule

VIOLATIONS_SHOWN = 10
"""Violations described in the JSON line (all of them go to stderr as they are found)."""


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "chaos", help="randomized fault schedules, histories checked", description=__doc__
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the first schedule")
    parser.add_argument("--schedules", type=int, default=None, help="how many (default 10)")
    parser.add_argument("--minutes", type=float, default=None, help="run this long at most")
    parser.add_argument("--ci", action="store_true", help="the small schedules CI plays")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-recovery", action="store_true", help="skip recovery_all_ms")
    parser.add_argument("--recovery-sessions", type=int, default=16)
    parser.add_argument("--recovery-fps", type=float, default=24.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--out-dir", default="", help="write the result as JSON under this directory too"
    )
    parser.set_defaults(func=_main)


class Summary:
    """What the schedules so far found, as the JSON line reports it."""

    def __init__(self, seed: int, shape: str) -> None:
        self.seed = seed
        self.shape = shape
        self.results: list[ScheduleResult] = []
        self.errors: list[tuple[int, str]] = []
        """(seed, error) of schedules the harness could not play."""
        self.recovery: RecoveryResult | None = None
        self.started = time.monotonic()

    @property
    def violations(self) -> list[tuple[int, Violation]]:
        found = [(r.schedule.seed, v) for r in self.results for v in r.violations]
        if self.recovery is not None:
            found += [(-1, v) for v in self.recovery.violations]
        return found

    def to_json(self) -> dict[str, Any]:
        violations = self.violations
        described = [
            (f"seed {seed}: " if seed >= 0 else "recovery phase: ") + str(v)
            for seed, v in violations
        ]
        described += [f"seed {seed}: the harness failed: {error}" for seed, error in self.errors]
        recovery = self.recovery
        return {
            "seed": self.seed,
            "shape": self.shape,
            "schedules": len(self.results),
            "faults_injected": sum(r.faults_injected for r in self.results),
            "frames_checked": sum(r.frames_checked for r in self.results),
            "invariant_violations": len(violations),
            "violations": described[:VIOLATIONS_SHOWN],
            "failing_seeds": sorted({r.schedule.seed for r in self.results if r.violations}),
            "harness_errors": len(self.errors),
            "sessions_lost": sum(r.sessions_lost for r in self.results)
            + (recovery.sessions_lost if recovery else 0),
            "recovery_all_ms": recovery.recovery_all_ms if recovery else None,
            "recovery_sessions": recovery.sessions if recovery else 0,
            "recovery_ms_median": _median(recovery.recovery_ms) if recovery else None,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


def _median(values: list[float]) -> float | None:
    return values[len(values) // 2] if values else None


def _say(text: str) -> None:
    print(f"[chaos] {text}", file=sys.stderr, flush=True)


def _report(result: ScheduleResult, args: argparse.Namespace) -> None:
    plan = result.schedule
    faults = ", ".join(f.describe() for f in result.faults) or "none fired"
    if result.injected_errors:
        faults += f"; {result.injected_errors} log-append errors injected"
    status = f"{len(result.violations)} VIOLATION(S)" if result.violations else "ok"
    _say(
        f"seed {plan.seed}: {status} in {result.elapsed_s:.0f}s, {len(plan.sessions)} sessions, "
        f"{result.frames_checked} frames checked, {result.sessions_lost} lost; faults: {faults}"
    )
    if result.violations:
        for violation in result.violations:
            _say(f"  {violation}")
        _say(plan.describe())
        failing = {v.session for v in result.violations}
        for history in result.histories:
            if any(history.session_id in label for label in failing):
                _say(history.describe())
        flags = " --ci" if args.ci else ""
        _say(f"reproduce: windflow bench chaos --seed {plan.seed} --schedules 1{flags}")
        _say(f"stack logs kept in {result.state_dir}")


async def _run(args: argparse.Namespace, summary: Summary) -> None:
    shape = schedules.CI if args.ci else schedules.FULL
    count = args.schedules if args.schedules is not None else (None if args.minutes else 10)
    deadline = summary.started + args.minutes * 60 if args.minutes else None
    i = 0
    while (count is None or i < count) and (deadline is None or time.monotonic() < deadline):
        plan = schedules.for_seed(args.seed + i, shape)
        i += 1
        _say(f"schedule {i}{f'/{count}' if count else ''}: seed {plan.seed}")
        state_dir = Path(tempfile.mkdtemp(prefix=f"windflow-chaos-{plan.seed}-"))
        try:
            result = await play_schedule(plan, state_dir, model=args.model)
        except Exception as exc:  # the harness or the stack failed: report it, go on
            summary.errors.append((plan.seed, repr(exc)))
            _say(f"seed {plan.seed}: the harness failed: {exc!r}; logs in {state_dir}")
            _say(plan.describe())
            continue
        summary.results.append(result)
        _report(result, args)
    if not args.no_recovery:
        _say(f"recovery phase: one worker with {args.recovery_sessions} sessions killed")
        state_dir = Path(tempfile.mkdtemp(prefix="windflow-chaos-recovery-"))
        summary.recovery = await recovery_all(
            state_dir, sessions=args.recovery_sessions, fps=args.recovery_fps, model=args.model
        )
        recovery = summary.recovery
        for violation in recovery.violations:
            _say(f"  recovery phase: {violation}")
        if recovery.violations or recovery.sessions_lost:
            _say(f"recovery phase logs kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def _table(result: dict[str, Any]) -> str:
    recovery = result["recovery_all_ms"]
    rows = [
        ("schedules", str(result["schedules"])),
        ("faults injected", str(result["faults_injected"])),
        ("frames checked", str(result["frames_checked"])),
        ("invariant violations", str(result["invariant_violations"])),
        ("failing seeds", " ".join(map(str, result["failing_seeds"])) or "-"),
        ("sessions lost", str(result["sessions_lost"])),
        (
            f"recovery, {result['recovery_sessions']} sessions (last / median)",
            "-"
            if not result["recovery_sessions"]
            else f"{recovery:.0f} / {result['recovery_ms_median']:.0f} ms"
            if recovery is not None
            else "a session never recovered",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _main(args: argparse.Namespace) -> int:
    from windflow.cli import bench_results

    started = dt.datetime.now(dt.UTC)
    summary = Summary(args.seed, "ci" if args.ci else "full")
    try:
        asyncio.run(_run(args, summary))
    except KeyboardInterrupt:
        _say("interrupted; the summary covers the schedules played")
    result = summary.to_json()
    print(_table(result), flush=True)
    for line in result["violations"]:
        print(f"  {line}", flush=True)
    if args.out_dir:
        path = bench_results.write(
            args.out_dir, "chaos", started, bench_results.machine(), {"result": result}
        )
        print(f"results written to {path}", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    failed = result["invariant_violations"] or result["sessions_lost"] or result["harness_errors"]
    return 1 if failed else 0
