"""``windflow bench migrate``: live migration measured end to end, on its own stack.

Three workers (the third in another region) and every service as a process. Sessions
stream through the SDK under one control script and the same seed, and a reference
session that never moves is played first: every frame of every moved session is compared
with it. The phases:

1. single moves: ``--sessions`` sessions stream while the router moves them, one at a time,
   ``--moves`` times in all, to the other local worker and back; one session never moves
   (its largest inter-frame gap is the run's baseline);
2. a drain: ``--drain-sessions`` streaming sessions are gathered on worker-1 (by moves,
   counted too), then worker-1 is drained (``Drain``) while they stream;
3. a region move: one streaming session moves to the worker in the other region;
4. an aborted move: its target is killed just before the move; the session must go on at
   its source without a stall;
5. a gateway kill: sessions stream through the SDK with two gateways; the one they use is
   SIGKILLed; the SDK resumes through the other;
6. a router leader kill: of the two router replicas, the leader is SIGKILLed while a
   session streams; a migration is asked of the replicas until one serves it
   (``router_failover_ms``: from the kill to the new leader serving, the move's own time
   left out).

Prints a table and ends with one JSON line (``--json``); writes the result under
``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.worker.models.registry import DEFAULT_MODEL
from windflow.cli import bench_results
from windflow.common import grpc_util
from windflow.errors import Unavailable
from windflow.infra import Stack, StackConfig
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

FPS = 24.0
SPEC: dict[str, Any] = {
    "format": "rgb",
    "output_policy": "pause",
    "fps": FPS,
    "quality": "fixed",  # frames compared with a reference run hold only at one quality
    "region": "local",
}
OTHER_REGION = "far"


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "migrate", help="live migration benchmark", description=__doc__
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sessions", type=int, default=3, help="streaming in phase 1")
    parser.add_argument("--moves", type=int, default=12, help="single moves in phase 1")
    parser.add_argument("--drain-sessions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--fps", type=float, default=FPS, help="every session's frame rate")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra argument for each worker"
    )
    parser.add_argument(
        "--out-dir", default="bench/results", help="where the JSON result file goes ('' = none)"
    )
    parser.set_defaults(func=_main)


@dataclass
class Stream:
    """One session played by the SDK in a task: what arrived, when, and its events."""

    client: Client
    live: Session
    frames: int
    got: list[tuple[int, bytes, float]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> Stream:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for f in self.live.frames(limit=self.frames):
            self.got.append((f.index, f.frame.data, time.monotonic()))
        await self.live.aclose()
        await self.client.close_session(self.live.id)  # its slot is free for the next phase

    async def at(self, frame: int) -> None:
        while not self.got or self.got[-1][0] < frame:
            assert self.task is not None
            if self.task.done():
                self.task.result()
                return
            await asyncio.sleep(0.01)

    async def done(self) -> Stream:
        assert self.task is not None
        await self.task
        return self

    @property
    def max_gap_ms(self) -> float:
        return max(((b[2] - a[2]) * 1000.0 for a, b in itertools.pairwise(self.got)), default=0.0)

    def migrated(self) -> int:
        return sum(e.kind == pb.SessionEvent.KIND_MIGRATED for e in self.live.events)


class Bench:
    def __init__(self, stack: Stack, args: argparse.Namespace, router: Any) -> None:
        self.stack = stack
        self.args = args
        self.router = router
        self.reference: list[bytes] = []
        self.script: list[tuple[int, int]] = []
        self.results: list[internal_pb2.MigrationResult] = []
        self.planned: list[Stream] = []
        """Streams moved by planned migrations (single moves, drain, region)."""
        self.checked: list[Stream] = []
        """Every stream compared with the reference."""

    async def play(self, client: Client, frames: int, *, region: str = "local") -> Stream:
        spec = {**SPEC, "region": region, "fps": self.args.fps}
        info = await client.create_session(self.args.model, seed=self.args.seed, **spec)
        live = await client.attach(info, controls=self.script)
        return Stream(client, live, frames).start()

    async def migrate(self, session_id: str, **where: str) -> internal_pb2.MigrationResult:
        result = await grpc_util.call(
            self.router.Migrate(internal_pb2.MigrateRequest(session_id=session_id, **where))
        )
        self.results.append(result)
        return result

    async def reference_run(self, client: Client, frames: int) -> None:
        info = await client.create_session(
            self.args.model, seed=self.args.seed, **{**SPEC, "fps": self.args.fps}
        )
        n = len(info.model.actions)
        self.script = [(f, (f // 9) % n) for f in range(0, frames, 9)]
        live = await client.attach(info, controls=self.script)
        stream = await Stream(client, live, frames).start().done()
        self.reference = [d for _, d, _ in stream.got]

    async def single_moves(self, client: Client, frames: int) -> float:
        """Phase 1; returns the unmoved session's largest gap (ms)."""
        streams = [await self.play(client, frames) for _ in range(self.args.sessions)]
        still = await self.play(client, frames)
        moved = 0
        for i in itertools.cycle(range(len(streams))):
            if moved >= self.args.moves:
                break
            s = streams[i]
            await s.at(30 + 8 * moved)
            if s.task is not None and s.task.done():
                break
            await self.migrate(s.live.id, reason="bench")
            moved += 1
            print(f"bench migrate: single move {moved}/{self.args.moves}", file=sys.stderr)
        for s in [*streams, still]:
            await s.done()
        self.planned += streams
        self.checked += [*streams, still]
        return still.max_gap_ms

    async def drain(self, client: Client, frames: int) -> float:
        """Phase 2; returns the drain's wall time (s)."""
        streams = [await self.play(client, frames) for _ in range(self.args.drain_sessions)]
        await asyncio.gather(*(s.at(10) for s in streams))
        for s in streams:  # gather them on worker-1
            placed = await client.get_session(s.live.id)
            if placed.worker_id != "worker-1":
                await self.migrate(s.live.id, to_worker_id="worker-1", reason="bench gather")
        print(f"bench migrate: draining {len(streams)} sessions off worker-1", file=sys.stderr)
        t0 = time.perf_counter()
        async for progress in self.router.Drain(internal_pb2.DrainRequest(worker_id="worker-1")):
            if progress.last.session_id:
                self.results.append(progress.last)
            if progress.done and (progress.failed or progress.remaining):
                raise RuntimeError(f"the drain left sessions behind: {progress.detail}")
        drain_s = time.perf_counter() - t0
        async for _ in self.router.Drain(
            internal_pb2.DrainRequest(worker_id="worker-1", undo=True)
        ):
            pass
        for s in streams:
            await s.done()
        self.planned += streams
        self.checked += streams
        return drain_s

    async def region_move(self, client: Client, frames: int) -> None:
        s = await self.play(client, frames)
        await s.at(20)
        await self.migrate(s.live.id, region=OTHER_REGION, reason="bench region")
        await s.done()
        self.planned.append(s)
        self.checked.append(s)

    async def aborted_move(self, client: Client, frames: int) -> bool:
        """Phase 4: True when the session went on at its source, every frame once, with no
        gap of a second."""
        s = await self.play(client, frames)
        await s.at(20)
        source = (await client.get_session(s.live.id)).worker_id
        target = next(w for w in ("worker-1", "worker-2") if w != source)
        pid = self.stack.supervisor.pids()[target]
        os.kill(pid, signal.SIGKILL)
        refused = False
        try:
            await self.migrate(s.live.id, to_worker_id=target, reason="bench abort")
        except Exception:
            refused = True
        await s.done()
        self.checked.append(s)
        placed = await client.get_session(s.live.id)
        return refused and placed.worker_id == source and s.max_gap_ms < 1000.0 and not s.migrated()

    async def router_kill(self, client: Client, frames: int) -> float:
        """Phase 6: ms from the leader's SIGKILL until the other replica served a move."""
        s = await self.play(client, frames)
        await s.at(20)
        leader = ""
        for _ in range(100):
            leading = [
                name
                for name in self.stack.router_names
                if "leads now" in self.stack.supervisor.log_path(name).read_text(errors="replace")
            ]
            if leading:
                leader = leading[-1]
                break
            await asyncio.sleep(0.05)
        if not leader:
            raise RuntimeError("no router replica says it leads")
        os.kill(self.stack.supervisor.pids()[leader], signal.SIGKILL)
        killed = time.perf_counter()
        while True:
            try:
                result = await self.migrate(s.live.id, reason="bench router kill")
                break
            except Unavailable:
                if time.perf_counter() - killed > 30:
                    raise
                await asyncio.sleep(0.05)
        served_ms = (time.perf_counter() - killed) * 1000.0 - result.total_ms
        await s.done()
        self.planned.append(s)
        self.checked.append(s)
        return served_ms

    async def gateway_kill(self, frames: int) -> float:
        """Phase 5: the largest gap (ms) of streams whose gateway was SIGKILLed."""
        gateways = self.stack.gateway_addresses
        async with Client(gateways, token=self.stack.token) as client:
            streams = [await self.play(client, frames) for _ in range(2)]
            await asyncio.gather(*(s.at(40) for s in streams))
            os.kill(self.stack.supervisor.pids()["gateway"], signal.SIGKILL)
            for s in streams:
                await s.done()
        self.checked += streams
        return max(s.max_gap_ms for s in streams)


def _check(streams: list[Stream], reference: list[bytes]) -> tuple[int, int, bool]:
    """(frames dropped, frames repeated, bit-exact) over ``streams``."""
    dropped = repeated = 0
    exact = True
    for s in streams:
        indices = [i for i, _, _ in s.got]
        repeated += len(indices) - len(set(indices))
        dropped += len(set(range(s.frames)) - set(indices))
        exact &= [d for _, d, _ in s.got] == reference[: s.frames]
    return dropped, repeated, exact


def _cutover_gaps(
    streams: list[Stream], results: list[internal_pb2.MigrationResult]
) -> list[float]:
    """The client's gap (ms) between the last frame of each move's source (F - 1) and the
    first of its target (F): what the hand-off itself costs a player."""
    arrivals = {s.live.id: {i: t for i, _, t in s.got} for s in streams}
    gaps = []
    for r in results:
        seen = arrivals.get(r.session_id, {})
        f = r.cutover_frame
        if f - 1 in seen and f in seen:
            gaps.append((seen[f] - seen[f - 1]) * 1000.0)
    return gaps


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    frames = 40 + 8 * args.moves + 40
    async with grpc_util.channel(stack.router_addresses) as channel:
        router = internal_pb2_grpc.RouterStub(channel)
        bench = Bench(stack, args, router)
        async with Client(stack.gateway_address, token=stack.token) as client:
            print("bench migrate: reference run", file=sys.stderr)
            await bench.reference_run(client, max(frames, 200))
            print("bench migrate: single moves", file=sys.stderr)
            baseline_ms = await bench.single_moves(client, frames)
            print("bench migrate: drain", file=sys.stderr)
            drain_s = await bench.drain(client, 200)
            print("bench migrate: region move", file=sys.stderr)
            await bench.region_move(client, 120)
            print("bench migrate: aborted move", file=sys.stderr)
            continued = await bench.aborted_move(client, 120)
            print("bench migrate: router leader kill", file=sys.stderr)
            router_ms = await bench.router_kill(client, 150)
        print("bench migrate: gateway kill", file=sys.stderr)
        gateway_gap_ms = await bench.gateway_kill(150) if len(stack.gateway_addresses) > 1 else None
    dropped, repeated, exact = _check(bench.checked, bench.reference)
    nominal = 1000.0 / args.fps
    max_gap = max(s.max_gap_ms for s in bench.planned)
    handoffs = [r.handoff_ms for r in bench.results]
    cutover_gaps = _cutover_gaps(bench.planned, bench.results)
    return {
        "migrations": len(bench.results),
        "dropped_frames": dropped,
        "repeated_frames": repeated,
        "max_gap_ms": round(max_gap, 1),
        "nominal_interval_ms": round(nominal, 1),
        "max_gap_ratio": round(max_gap / nominal, 2),
        "baseline_max_gap_ms": round(baseline_ms, 1),
        "cutover_gap_ms_p50": round(_pct(cutover_gaps, 0.5), 1),
        "cutover_gap_ms_max": round(max(cutover_gaps, default=0.0), 1),
        "handoff_ms_p50": round(_pct(handoffs, 0.5), 1),
        "handoff_ms_p99": round(_pct(handoffs, 0.99), 1),
        "prepare_ms_p50": round(statistics.median(r.prepare_ms for r in bench.results), 1),
        "snapshot_bytes": max(r.snapshot_bytes for r in bench.results),
        "drain_s": round(drain_s, 2),
        "drain_sessions": args.drain_sessions,
        "bit_exact": exact,
        "aborted_source_continued": continued,
        "router_failover_ms": round(router_ms, 1),
        "gateway_failover_max_gap_ms": None if gateway_gap_ms is None else round(gateway_gap_ms, 1),
    }


async def _run(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    config = StackConfig(
        state_dir=state_dir,
        workers=3,
        gateways=2,
        routers=2,
        worker_regions={"worker-3": OTHER_REGION},
        worker_args=bench_results.stack_worker_args(args),
    )
    async with Stack(config) as stack:
        return await measure(stack, args)


def _main(args: argparse.Namespace) -> int:
    return bench_results.run_stack_bench(
        "migrate",
        args,
        lambda state_dir: _run(args, state_dir),
        bench_results.key_value_table,
        lambda r: bool(
            r["bit_exact"]
            and not r["dropped_frames"]
            and not r["repeated_frames"]
            and r["aborted_source_continued"]
        ),
    )
