"""``windflow demo``: start the whole stack, play a session with the built-in model, stop.

What `make demo` runs: etcd, NATS, router, session service, gateway and two workers as
separate processes; a few seconds of a session streamed through the gateway into an MP4;
the play summary; then everything stops.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from windflow.cli.play import add_play_arguments, play_from_args, print_summary
from windflow.infra import Stack, StackConfig, StackFailed


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="start the stack, play a session, stop", description=__doc__
    )
    parser.add_argument("--workers", type=int, default=2)
    add_play_arguments(parser)
    parser.set_defaults(func=_main, out="demo.mp4", model="windflow-world")
    parser.set_defaults(frames=144)


async def _demo(args: argparse.Namespace, state_dir: Path) -> int:
    async with Stack(StackConfig(state_dir=state_dir, workers=args.workers)) as stack:
        print(f"windflow demo: stack ready, gateway {stack.gateway_address}", flush=True)
        summary = await play_from_args(stack.gateway_address, args, stack.token)
        print_summary(summary, args.json)
    return 0


def _main(args: argparse.Namespace) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="windflow-demo-"))
    try:
        code = asyncio.run(_demo(args, state_dir))
    except StackFailed as exc:
        print(
            f"windflow demo: the stack failed: {exc}; logs in {state_dir / 'logs'}", file=sys.stderr
        )
        return 1
    shutil.rmtree(state_dir, ignore_errors=True)
    return code
