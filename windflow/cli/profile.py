"""``windflow profile``: measure a model where it runs and write its versioned profile.

    windflow profile --model windflow-world [--worker-class cpu-2core] [--json]

Times the model as a worker runs it (in a model host, through the call the worker's
calibration times): batched step + encoding at every rung of its step ladder and batch
sizes 1, 2, 4, 8, 16; the encoding of a frame by format and output size; the memory of
one session. Writes ``profiles/<model>@<worker class>.json`` (machine, commit, model
version, figures), which ``windflow plan`` reads (docs/operations.md, "Profiles"). A
table goes to stdout (stderr with ``--json``, which ends stdout with one JSON line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.worker.models.registry import DEFAULT_MODEL, known_models
from windflow.errors import WindflowError
from windflow.ops import profile as profiles


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "profile", help="measure a model here and write its profile", description=__doc__
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"one of {', '.join(known_models())}"
    )
    parser.add_argument(
        "--worker-class",
        default=None,
        help="the catalog's name of this machine's class (default: h100/h200/... on a GPU, "
        "else cpu-<cores>core)",
    )
    parser.add_argument("--out-dir", default=str(profiles.PROFILE_DIR), help="('' = none)")
    parser.add_argument("--repeats", type=int, default=profiles.DEFAULT_REPEATS)
    parser.add_argument(
        "--in-process", action="store_true", help="step the model in this process, no host"
    )
    parser.add_argument(
        "--step-threads",
        type=int,
        default=1,
        help="torch threads of the step, as the workers' --step-threads (default 1)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option (e.g. path=/checkpoints/wan for a real checkpoint)",
    )
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    parser.set_defaults(func=run)


def summary(record: dict[str, Any], path: Path | None) -> dict[str, Any]:
    model = record["model"]
    default = str(model["default_steps"])
    return {
        "path": str(path) if path else None,
        "model": model["id"],
        "version": model["version"],
        "worker_class": record["worker_class"],
        "where": record["where"],
        "step_threads": record["step_threads"],
        "commit": (record.get("revision") or {}).get("commit"),
        "duration_s": record["duration_s"],
        "batch_ms_p50_default_steps": {
            b: fig["p50"] for b, fig in record["batch_ms"][default].items()
        },
        "encode_ms_native_jpeg": record["encode_ms"][
            profiles.encode_key("jpeg", model["width"], model["height"])
        ]["p50"],
        "session_bytes": record["memory"]["state_bytes"],
    }


def table(record: dict[str, Any]) -> str:
    model = record["model"]
    lines = [
        f"{model['id']} {model['version']} on {record['worker_class']} "
        f"({record['where']}; {record['machine'].get('cpu')}, {record['machine'].get('cores')} "
        f"cores; load {record['machine'].get('loadavg_at_start')})",
        "batch ms (step + native JPEG, p50 / p90), by steps and batch size:",
    ]
    for steps, by_batch in record["batch_ms"].items():
        cells = "  ".join(f"b{b}: {f['p50']:.2f}/{f['p90']:.2f}" for b, f in by_batch.items())
        lines.append(f"  {steps} steps  {cells}")
    enc = "  ".join(f"{k}: {v['p50']:.3f} ms" for k, v in record["encode_ms"].items())
    lines.append(f"encode per frame (p50): {enc}")
    mem = record["memory"]
    lines.append(
        "memory per session: state {state_bytes} B, snapshot {snapshot_bytes} B, ring copies "
        "{ring_copies}, host RSS {model_rss_bytes} B (+{rss_per_session_bytes} B a session)".format(
            **mem
        )
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"windflow profile: --option {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        options[key] = value
    worker_class = args.worker_class or profiles.default_worker_class()
    try:
        record = profiles.measure(
            args.model,
            worker_class=worker_class,
            repeats=max(1, args.repeats),
            in_process=args.in_process,
            step_threads=max(1, args.step_threads),
            options=options,
            progress=lambda m: print(f"profile: {m}", file=sys.stderr, flush=True),
        )
    except WindflowError as exc:
        print(f"windflow profile: {exc.message}", file=sys.stderr)
        return 2
    path = profiles.write(record, Path(args.out_dir)) if args.out_dir else None
    out = sys.stderr if args.json else sys.stdout
    print(table(record), file=out, flush=True)
    if path is not None:
        print(f"profile written to {path}", file=out, flush=True)
    if args.json:
        print(json.dumps(summary(record, path)), flush=True)
    return 0
