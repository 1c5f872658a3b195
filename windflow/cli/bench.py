"""``windflow bench <name>``: the repo's benchmarks, each a module exposing ``register``."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCH_MODULES: tuple[str, ...] = (
    "windflow.cli.bench_wan",
    "windflow.cli.bench_state",
    "windflow.cli.bench_runtime",
    "windflow.cli.bench_chaos",
    "windflow.cli.bench_migrate",
    "windflow.cli.bench_access",
    "windflow.cli.bench_sim",
    "windflow.cli.bench_browser",
    "windflow.cli.bench_controls",
)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("bench", help="run a benchmark")
    bench_sub = parser.add_subparsers(dest="bench", required=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(bench_sub)
