"""Where benchmark results go: one JSON file per run under ``bench/results/``, with the
machine it ran on (results from a shared machine mean little without it)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def revision() -> dict[str, Any] | None:
    """The git commit of the code that ran, and whether its tracked files had changes
    (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "local_changes": bool(changed)}


def _command(bench: str) -> str:
    """The command line that ran ``bench`` (global options before it left out)."""
    argv = sys.argv[1:]
    rest = argv[argv.index(bench) + 1 :] if bench in argv else []
    return " ".join(["windflow", "bench", bench, *rest])


def write(
    out_dir: str,
    bench: str,
    started: dt.datetime,
    machine_desc: dict[str, Any],
    fields: dict[str, Any],
) -> Path:
    """Write one run's record as ``<out_dir>/<bench>-<started, UTC>.json``: the bench, the
    command that ran it, the code's revision, when, on what machine, then ``fields``;
    returns the path."""
    record = {
        "bench": bench,
        "command": _command(bench),
        "revision": revision(),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_desc,
        **fields,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def stack_worker_args(args: Any) -> tuple[str, ...]:
    """The workers' flags of a benchmark's own stack: ``args.model``, a 2 s lease (a killed
    worker's sessions move soon), then ``args.worker_arg``."""
    return ("--models", args.model, "--lease-ttl", "2", "--heartbeat", "0.5", *args.worker_arg)


def key_value_table(result: dict[str, Any]) -> str:
    """A result as one ``key  value`` line per key, the values aligned."""
    width = max(len(k) for k in result)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in result.items())


def run_stack_bench(
    bench: str,
    args: Any,
    run: Callable[[Path], Coroutine[Any, Any, dict[str, Any]]],
    table: Callable[[dict[str, Any]], str],
    passed: Callable[[dict[str, Any]], bool],
) -> int:
    """The frame of a benchmark that starts its own stack: ``run(state_dir)`` measures;
    the table is printed, the record written under ``args.out_dir`` ('' = none) with
    ``args.model`` and ``args.worker_arg``, and with ``args.json`` one JSON line ends the
    output. The state dir (the stack's logs) is kept when the stack or a check fails."""
    from windflow.infra import StackFailed

    started = dt.datetime.now(dt.UTC)
    machine_desc = machine()
    state_dir = Path(tempfile.mkdtemp(prefix=f"windflow-bench-{bench}-"))
    try:
        result = asyncio.run(run(state_dir))
    except StackFailed as exc:
        print(f"bench {bench}: the stack failed: {exc}; logs in {state_dir}", file=sys.stderr)
        return 1
    print(table(result), flush=True)
    if args.out_dir:
        fields = {"model": args.model, "worker_args": args.worker_arg, "result": result}
        path = write(args.out_dir, bench, started, machine_desc, fields)
        print(f"results written to {path}", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    if not passed(result):
        print(f"windflow bench {bench}: a check FAILED; logs in {state_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0
