"""``windflow bench access``: token checks, metering, parking and reclaiming, measured.

On its own stack (two workers of ``--capacity`` sessions each, the gateway authenticating,
short reclaiming limits), every service a process:

1. verification: the gateway's token check, in this process: ``verify_us_p50`` is what an
   RPC pays (a token verified before: a cache hit plus the checks that can change), and
   ``verify_first_us_p50`` a token's first check (the Ed25519 signature);
2. metering: a session streams, its worker is SIGKILLed (it recovers on the other), it
   is live-migrated back, then it closes; another streams untouched. ``metering_exact``:
   per session, the ledger's billed seconds equal the frames delivered / fps within one
   second;
3. parking: a session streams, then its client goes; the reclaimer parks it after
   ``--park-after-s`` (``park_ms``: the park itself, from the session service's log) and
   an attach resumes it (``unpark_first_frame_ms``: from the attach to its first frame);
4. reclaiming: sessions are created until the stack is full and abandoned, never
   attached; ``capacity_back_s``: from the last one to the next CreateSession that
   succeeds, and ``reclaimed``: those closed by then.

Prints a table and ends with one JSON line (``--json``); writes the result under
``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
from etcd3aio import Etcd3Client

from services.worker.models.registry import DEFAULT_MODEL
from windflow.access import tokens
from windflow.access.keys import AccessStore
from windflow.access.usage import Ledger
from windflow.cli import bench_results
from windflow.common import grpc_util
from windflow.errors import ResourceExhausted
from windflow.infra import Stack, StackConfig
from windflow.sdk import Client
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

FPS = 24.0
SPEC: dict[str, Any] = {"format": "jpeg", "fps": FPS, "output_policy": "pause"}


def register(sub: Any) -> None:
    parser = sub.add_parser("access", help="access, metering and reclaiming", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--capacity", type=int, default=4, help="sessions per worker")
    parser.add_argument("--seconds", type=float, default=3.0, help="each metering leg")
    parser.add_argument("--unattached-s", type=float, default=5.0, help="never-attached limit")
    parser.add_argument("--park-after-s", type=float, default=2.0)
    parser.add_argument("--verify-n", type=int, default=20000, help="token checks timed")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra argument for each worker"
    )
    parser.add_argument(
        "--out-dir", default="bench/results", help="where the JSON result file goes ('' = none)"
    )
    parser.set_defaults(func=_main)


def measure_verify(n: int) -> tuple[float, float]:
    """(cached, first) median microseconds of ``TokenVerifier.verify``."""
    key = tokens.SigningKey.generate()
    verifier = tokens.TokenVerifier()
    verifier.update_keys([key.public_only()])
    minted = [tokens.mint(key, tenant="bench", key_id="k", budget_s=60)[0] for _ in range(500)]
    first = []
    for token in minted:
        t0 = time.perf_counter_ns()
        verifier.verify(token)
        first.append((time.perf_counter_ns() - t0) / 1000)
    token = minted[0]
    cached = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        verifier.verify(token)
        cached.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(cached), statistics.median(first)


async def _stream(client: Client, session: pb.Session, seconds: float) -> list[int]:
    live = await client.attach(session)
    got = [f.index async for f in live.frames(limit=round(seconds * FPS))]
    await live.aclose()
    return got


async def measure_metering(
    stack: Stack, store: AccessStore, ledger: Ledger, seconds: float
) -> dict[str, Any]:
    _, api_key = await store.create_key("metering")
    token, claims = await store.mint(api_key)
    delivered: dict[str, set[int]] = {}
    async with Client(stack.gateway_address, token=token) as client:
        moved = await client.create_session(DEFAULT_MODEL, seed=1, **SPEC)
        still = await client.create_session(DEFAULT_MODEL, seed=2, **SPEC)
        calm = asyncio.create_task(_stream(client, still, 3 * seconds))
        seen = await _stream(client, moved, seconds)
        worker = (await client.get_session(moved.session_id)).worker_id
        live = await client.attach(moved, resume_from=seen[-1] + 1)
        async for frame in live.frames(limit=round(seconds * FPS)):
            seen.append(frame.index)
            if len(seen) == round(1.5 * seconds * FPS):
                os.kill(stack.supervisor.pids()[worker], signal.SIGKILL)
        async with grpc_util.channel(stack.router_addresses) as channel:
            router = internal_pb2_grpc.RouterStub(channel)
            for _ in range(50):  # the killed worker comes back (the supervisor restarts it)
                try:
                    await router.Migrate(
                        internal_pb2.MigrateRequest(session_id=moved.session_id, reason="bench")
                    )
                    break
                except grpc.aio.AioRpcError:  # (no other worker is back yet)
                    await asyncio.sleep(0.2)
            async for frame in live.frames(limit=round(seconds * FPS)):
                seen.append(frame.index)
        await live.aclose()
        delivered[moved.session_id] = set(seen)
        delivered[still.session_id] = set(await calm)
        for session in (moved, still):
            await client.close_session(session.session_id)
    await asyncio.sleep(2.0)  # the last records reach the ledger
    errors: dict[str, float] = {}
    for session_id, frames in delivered.items():
        usage = await ledger.session(session_id)
        billed = usage.seconds if usage is not None else 0.0
        errors[session_id] = round(billed - len(frames) / FPS, 3)
    token_s = await ledger.token_seconds(claims.jti)
    return {
        "metering_exact": all(abs(e) <= 1.0 for e in errors.values()),
        "metering_error_s": list(errors.values()),
        "metering_token_s": round(token_s, 3),
        "metering_delivered_s": round(sum(len(f) for f in delivered.values()) / FPS, 3),
    }


async def measure_parking(stack: Stack, token: str, park_after_s: float) -> dict[str, Any]:
    async with Client(stack.gateway_address, token=token) as client:
        session = await client.create_session(DEFAULT_MODEL, seed=3, **SPEC)
        seen = await _stream(client, session, 1.0)
        deadline = time.monotonic() + park_after_s + 10
        while (await client.get_session(session.session_id)).state != pb.SESSION_STATE_PARKED:
            if time.monotonic() > deadline:
                raise RuntimeError("the session was never parked")
            await asyncio.sleep(0.05)
        log = stack.supervisor.log_path("session").read_text(errors="replace")
        found = re.search(rf"parked session {session.session_id} at frame \d+ in ([\d.]+) ms", log)
        t0 = time.perf_counter()
        live = await client.attach(session, resume_from=seen[-1] + 1)
        first = await anext(live.frames())
        unpark_ms = (time.perf_counter() - t0) * 1000
        await live.aclose()
        await client.close_session(session.session_id)
    return {
        "park_ms": float(found.group(1)) if found else None,
        "unpark_first_frame_ms": round(unpark_ms, 1),
        "unpark_resumed_at_next_frame": first.index == seen[-1] + 1,
    }


async def measure_reclaim(stack: Stack, token: str, unattached_s: float) -> dict[str, Any]:
    async with Client(stack.gateway_address, token=token) as client:
        abandoned = []
        while True:
            try:
                abandoned.append(await client.create_session(DEFAULT_MODEL, seed=4, **SPEC))
            except ResourceExhausted as err:
                if "faster than" in err.message:  # the tenant's creation rate
                    await asyncio.sleep(err.retry_after_s or 0.1)
                    continue
                break
        full_at = time.monotonic()
        while True:
            try:
                fresh = await client.create_session(DEFAULT_MODEL, seed=5, **SPEC)
                break
            except ResourceExhausted:
                if time.monotonic() - full_at > unattached_s + 60:
                    raise RuntimeError("capacity never came back") from None
                await asyncio.sleep(0.1)
        back_s = time.monotonic() - full_at
        await client.close_session(fresh.session_id)
        deadline = time.monotonic() + 10  # the rest, in the reclaimer's next rounds
        while True:
            states = [(await client.get_session(s.session_id)).state for s in abandoned]
            if all(s == pb.SESSION_STATE_CLOSED for s in states) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    return {
        "abandoned": len(abandoned),
        "reclaimed": sum(1 for s in states if s == pb.SESSION_STATE_CLOSED),
        "capacity_back_s": round(back_s, 2),
        "capacity_back_goal_s": unattached_s + 5,
    }


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    cached_us, first_us = measure_verify(args.verify_n)
    result: dict[str, Any] = {
        "verify_us_p50": round(cached_us, 2),
        "verify_first_us_p50": round(first_us, 1),
    }
    etcd = Etcd3Client([stack.etcd_endpoint])
    await etcd.connect()
    try:
        store = AccessStore(etcd)
        result |= await measure_metering(stack, store, Ledger(etcd), args.seconds)
        result |= await measure_parking(stack, stack.token, args.park_after_s)
        result |= await measure_reclaim(stack, stack.token, args.unattached_s)
    finally:
        await etcd.close()
    return result


async def _run(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    config = StackConfig(
        state_dir=state_dir,
        workers=2,
        worker_args=(
            *bench_results.stack_worker_args(args),
            "--capacity",
            str(args.capacity),
            "--admission",
            "slots",
        ),
        session_args=(
            "--close-unattached-s",
            str(args.unattached_s),
            "--park-after-s",
            str(args.park_after_s),
            "--reclaim-every-s",
            "0.2",
        ),
    )
    async with Stack(config) as stack:
        return await measure(stack, args)


def _main(args: argparse.Namespace) -> int:
    return bench_results.run_stack_bench(
        "access",
        args,
        lambda state_dir: _run(args, state_dir),
        bench_results.key_value_table,
        lambda r: bool(
            r["metering_exact"]
            and r["unpark_resumed_at_next_frame"]
            and r["reclaimed"] == r["abandoned"]
        ),
    )
