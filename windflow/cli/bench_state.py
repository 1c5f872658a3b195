"""``windflow bench state``: fork, rewind, replay and crash recovery, measured end to end.

Starts its own stack (etcd, NATS, every service as a process, two workers) unless
``--gateway`` is given; crash recovery needs its own stack (it kills a worker). Prints a
table and writes the result under ``bench/results/`` with the machine's description; with
``--json`` the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from services.worker.models.registry import DEFAULT_MODEL
from windflow.cli import bench_results
from windflow.infra import Stack, StackConfig
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

SPEC: dict[str, Any] = {
    "format": "rgb",
    "output_policy": "pause",
    "fps": 48.0,
    # Every check compares two sessions frame for frame, which holds only at one quality:
    # an adaptive session that steps down (as a recovered one may while the restarted
    # worker calibrates beside it on a small machine) makes other, equally valid frames.
    "quality": "fixed",
}


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "state", help="fork/rewind/replay/recovery benchmark", description=__doc__
    )
    parser.add_argument("--gateway", default=None, help="use a running stack (no recovery run)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--forks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra argument for each worker (repeatable), e.g. --worker-arg=--pipeline-depth=1",
    )
    parser.add_argument(
        "--out-dir", default="bench/results", help="where the JSON result file goes ('' = none)"
    )
    parser.set_defaults(func=_main)


def _script(n_actions: int, frames: int) -> list[tuple[int, int]]:
    return [(f, (f // 9) % n_actions) for f in range(0, frames, 9)]


async def _stream(
    client: Client,
    session: pb.Session,
    controls: list[tuple[int, int]],
    count: int,
    *,
    on_frame: Any = None,
    recovered: list[tuple[int, int]] | None = None,
) -> list[tuple[int, bytes, int]]:
    """(index, bytes, arrival us) of ``count`` frames; controls beyond the first 20 are sent
    40 frames ahead of their frame as the stream runs. ``recovered`` gets (index, arrival us)
    of the first frame after a KIND_RECOVERED event (the first the new worker made:
    frames already buffered on the way when the old one died come before the event)."""
    first = next((f for f, _ in controls if f >= session.head_frame), session.head_frame)
    upfront = [c for c in controls if c[0] >= first][:20]
    later = {f: a for f, a in controls if f >= first and (f, a) not in upfront}
    live = await client.attach(session, controls=upfront)
    out: list[tuple[int, bytes, int]] = []
    try:
        async for frame in live.frames(limit=count):
            out.append((frame.index, frame.frame.data, frame.received_us))
            if recovered is not None and not recovered and _recovered(live.events):
                recovered.append((frame.index, frame.received_us))
            ahead = frame.index + 40
            if ahead in later:
                await live.send(action=later.pop(ahead), frame_index=ahead)
            if on_frame is not None:
                await on_frame(frame.index)
    finally:
        await live.aclose()
    return out


def _recovered(events: Any) -> bool:
    return any(e.kind == pb.SessionEvent.KIND_RECOVERED for e in events)


async def measure(gateway: str, args: argparse.Namespace, stack: Stack | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    n = args.frames
    async with Client(gateway, token=stack.token if stack is not None else None) as client:
        reference_info = await client.create_session(args.model, seed=args.seed, **SPEC)
        controls = _script(len(reference_info.model.actions), n)
        reference = [d for _, d, _ in await _stream(client, reference_info, controls, n)]
        head = (await client.get_session(reference_info.session_id)).head_frame

        # replay [0, min(200, n)) against what the client received
        upto = min(200, n)
        replayed = [f.frame.data async for f in client.replay(reference_info.session_id, 0, upto)]
        replay_exact = replayed == reference[:upto]

        # forks at recent frames: latency of the Fork call; continuation compared bit for bit
        fork_ms: list[float] = []
        fork_exact = True
        for i in range(args.forks):
            k = rng.randint(max(0, n - 60), n - 10)
            t0 = time.perf_counter()
            child = await client.fork(reference_info.session_id, k)
            fork_ms.append((time.perf_counter() - t0) * 1000)
            if i < 3:
                got = [d for _, d, _ in await _stream(client, child, controls, 10)]
                fork_exact &= got == reference[k : k + 10]
            await client.close_session(child.session_id)

        # rewind a session to its middle and play the same controls again
        rewind_info = await client.create_session(args.model, seed=args.seed + 1, **SPEC)
        first = [d for _, d, _ in await _stream(client, rewind_info, controls, 100)]
        rewind_info = await client.rewind(rewind_info.session_id, 50)
        again = [d for _, d, _ in await _stream(client, rewind_info, controls, 50)]
        rewind_exact = again == first[50:100]

        recovery: dict[str, Any] = {}
        if stack is not None:
            recovery = await _recovery(client, stack, args, controls, reference)
        await client.close_session(reference_info.session_id)
    return {
        "model": args.model,
        "frames": n,
        "head": head,
        "fork_ms_p50": statistics.median(fork_ms),
        "fork_ms_max": max(fork_ms),
        "forks": len(fork_ms),
        "fork_bit_exact": fork_exact,
        "rewind_bit_exact": rewind_exact,
        "replay_bit_exact": replay_exact,
        **recovery,
    }


async def _recovery(
    client: Client,
    stack: Stack,
    args: argparse.Namespace,
    controls: list[tuple[int, int]],
    reference: list[bytes],
) -> dict[str, Any]:
    info = await client.create_session(args.model, seed=args.seed, **SPEC)
    kill_at = args.frames // 3
    killed_us = 0

    async def maybe_kill(index: int) -> None:
        nonlocal killed_us
        if index == kill_at:
            victim = (await client.get_session(info.session_id)).worker_id
            os.kill(stack.supervisor.pids()[victim], signal.SIGKILL)
            killed_us = time.time_ns() // 1000

    first_new: list[tuple[int, int]] = []
    got = await _stream(
        client, info, controls, args.frames, on_frame=maybe_kill, recovered=first_new
    )
    indices = [i for i, _, _ in got]
    return {
        # None (and a failed check below) when the client never saw the session recover
        "recovery_ms": (first_new[0][1] - killed_us) / 1000.0 if first_new else None,
        "recovery_first_frame": first_new[0][0] if first_new else None,
        "recovery_event": bool(first_new),
        "recovery_no_gap": indices == list(range(args.frames)),
        "recovery_bit_exact": [d for _, d, _ in got] == reference,
    }


def _ms(value: float | None) -> str:
    return "no RECOVERED event" if value is None else f"{value:.0f} ms"


def _table(result: dict[str, Any]) -> str:
    rows = [
        ("fork p50 / max", f"{result['fork_ms_p50']:.1f} / {result['fork_ms_max']:.1f} ms"),
        ("fork bit-exact", str(result["fork_bit_exact"])),
        ("rewind bit-exact", str(result["rewind_bit_exact"])),
        ("replay bit-exact", str(result["replay_bit_exact"])),
    ]
    if "recovery_ms" in result:
        rows += [
            ("recovery (kill -> first new frame)", _ms(result["recovery_ms"])),
            ("recovery no gap / repeat", str(result["recovery_no_gap"])),
            ("recovery bit-exact", str(result["recovery_bit_exact"])),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


async def _run(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    if args.gateway:
        return await measure(args.gateway, args, None)
    config = StackConfig(
        state_dir=state_dir,
        workers=2,
        worker_args=bench_results.stack_worker_args(args),
    )
    async with Stack(config) as stack:
        return await measure(stack.gateway_address, args, stack)


def _main(args: argparse.Namespace) -> int:
    return bench_results.run_stack_bench(
        "state",
        args,
        lambda state_dir: _run(args, state_dir),
        _table,
        lambda r: all(v for k, v in r.items() if k.endswith(("_exact", "_no_gap", "_event"))),
    )
