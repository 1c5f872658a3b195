"""``windflow plan`` on the committed example workload, as a user runs it: one JSON line
on stdout with the issue's keys, meeting its goals (docs/operations.md, "Planner")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _windflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "windflow", "--log-level", "WARNING", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plan_the_example_workload() -> None:
    done = _windflow("plan", "examples/workload.yaml", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # --json: nothing else on stdout
    result = json.loads(lines[0])
    for key in (
        "plan",
        "cost_per_hour",
        "naive_cost_per_hour",
        "savings_ratio",
        "headroom",
        "simulated_deadline_attainment",
        "simulated_refusals",
        "solve_ms",
        "solver",
    ):
        assert key in result, key
    assert result["solver"] == "milp"
    assert result["solve_ms"] < 10_000
    assert result["simulated_deadline_attainment"] >= 0.99
    assert result["simulated_refusals"] == 0
    assert 0 < result["cost_per_hour"] < result["naive_cost_per_hour"]
    assert result["savings_ratio"] == round(
        1 - result["cost_per_hour"] / result["naive_cost_per_hour"], 4
    )
    regions = {p["region"] for p in result["plan"]}
    assert regions == {"us-east", "eu-west", "ap-south"}
    for entry in result["plan"]:
        assert set(entry) >= {
            "worker_class",
            "region",
            "model",
            "rung",
            "steps",
            "fps",
            "replicas",
            "spot",
        }
    for name, room in result["headroom"].items():
        assert room["spare_sessions"] >= 0, name
    # the GPU classes of the catalog have no profile: listed, not planned
    assert set(result["unprofiled"]) == {"h100", "h200"}
    assert "cost_per_hour:" not in done.stderr and "arena-us" in done.stderr  # the table


def test_plan_errors_name_the_field_and_the_binding_constraint(tmp_path: Path) -> None:
    bad = tmp_path / "workload.yaml"
    bad.write_text(
        f"catalog: {ROOT / 'examples' / 'catalog.yaml'}\n"
        "demands:\n"
        "  - model: windflow-world\n"
        "    region: us-east\n"
        "    fps: twenty\n"
        "    latency_ms: 40\n"
        "    peak_sessions: 4\n"
    )
    done = _windflow("plan", str(bad), "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "line 5: demands[0].fps: expected a number, got 'twenty'" in done.stderr
    bad.write_text(
        bad.read_text().replace("twenty", "24").replace("latency_ms: 40", "latency_ms: 1")
    )
    done = _windflow("plan", str(bad), "--json", "--no-simulate")
    assert done.returncode == 3
    assert "infeasible" in done.stderr and "latency: no worker class in us-east" in done.stderr


def test_plan_emits_a_kubernetes_overlay(tmp_path: Path) -> None:
    out = tmp_path / "overlay"
    done = _windflow(
        "plan", "examples/workload.yaml", "--json", "--no-simulate", "--emit-k8s", str(out)
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["simulated_deadline_attainment"] is None
    written = [Path(p) for p in result["k8s"]]
    assert written[0].name == "kustomization.yaml"
    assert all(p.is_file() and p.parent == out for p in written)
    assert any(p.name == "worker-cpu-2core-us-east.yaml" for p in written)
