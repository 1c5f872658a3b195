"""``windflow bench sim``: lockstep sessions as a simulator, measured (docs/simulation.md).

On its own stack (one worker of ``--capacity`` sessions, the gateway authenticating with
the stack's development token, no bridge), every service a process:

1. ``raw_steps_per_s``: the model stepped in this process as the worker steps it
   (``stepping.step_and_encode``: a batched step and the RGB encoding of each frame, one
   torch thread, batches of at most the model's max batch), random actions, for 1, 8 and
   32 states, over ``--seconds`` each: the most the worker could make of them;
2. ``env_steps_per_s``: ``WindflowVectorEnv`` (windflow/env.py) of 1, 8 and 32 envs
   stepped with random actions over ``--seconds``: env steps (frames) per second, each
   step a control sent and its frame received through the gateway. ``env_ratio``: the
   two, divided; ``env_ratio_min`` the least of 8 and 32 envs. ``env_batch_sizes``: the
   frames of each run by the size of the worker batch that made them;
3. ``interactive_isolation``: an interactive session (24 fps, fixed quality, JPEG, as a
   player) read for ``--isolation-seconds`` alone, then as long beside 32 lockstep envs
   stepping as fast as they can: its delivered fps beside them over its fps alone (and
   ``lockstep_steps_per_s_beside``, what the envs made meanwhile, and
   ``lockstep_share_beside``, that over their steps per second alone);
4. ``fork_many_ms``: the p50 of ``--fork-reps`` ``fork_many(parent, 10, 16)`` calls (the
   16 branches closed after each) from frame 10 of a lockstep session;
   ``fork_many_bit_exact``: ``client.rollouts`` of 16 six-frame scripts from there, and
   each of the first four branches' frames equal to a fresh session's given the same
   history and script (as tests/e2e/test_lockstep.py checks).

Goals (``goals`` in the result): ``env_ratio_min`` >= 0.8, ``interactive_isolation`` >=
0.95, ``fork_many_ms`` <= 100, bit-exact; and one more, as isolation means little if the
lockstep envs were starved meanwhile: ``lockstep_share_beside`` (their steps per second
beside the interactive session over theirs alone, 32 envs) >= 0.5. Where the router
refuses 16 forks at the model's fps for headroom, the fork phase runs again with lockstep
sessions of 1 fps and says so (``fork_many_session_fps``,
``fork_many_refused_at_native_fps``; docs/simulation.md, "Open problems"). Progress goes
to stderr and one JSON line to stdout; ``--json`` also records the result under
``--out-dir`` (``bench/results/sim-<UTC>.json``, with the machine and its load). Exit 1
when the branches are not bit-exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from services.worker.models.registry import DEFAULT_MODEL
from windflow.cli import bench_results

SIZES = (1, 8, 32)
ISOLATION_ENVS = 32
FORKS = 16
FORK_AT = 10
GOALS = {
    "env_ratio_min": 0.8,
    "interactive_isolation": 0.95,
    "fork_many_ms": 100.0,
}
INTERACTIVE: dict[str, Any] = {"fps": 24.0, "quality": "fixed", "format": "jpeg"}
LOCKSTEP: dict[str, Any] = {"session_class": "lockstep", "format": "rgb"}


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "sim", help="lockstep sessions: env throughput, isolation, fork_many", description=__doc__
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--capacity", type=int, default=64, help="the worker's session slots")
    parser.add_argument("--seconds", type=float, default=3.0, help="each throughput run")
    parser.add_argument(
        "--isolation-seconds", type=float, default=4.0, help="each interactive window"
    )
    parser.add_argument("--fork-reps", type=int, default=5, help="fork_many calls timed")
    parser.add_argument("--json", action="store_true", help="record the result")
    parser.add_argument(
        "--out-dir", default="bench/results", help="where --json records the result"
    )
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra argument for the worker"
    )
    parser.set_defaults(func=_main)


def progress(text: str) -> None:
    print(f"[sim] {text}", file=sys.stderr, flush=True)


# ---- the raw model, in this process ----


def measure_raw(model_id: str, sizes: tuple[int, ...], seconds: float) -> dict[str, float]:
    """Frames per second of the model stepped here as the worker steps it, per batch of
    states (``stepping.step_and_encode``, RGB at the native size, one torch thread)."""
    import torch

    from services.worker.models.base import Control
    from services.worker.models.registry import load_model
    from services.worker.stepping import Capture, Encoding, step_and_encode
    from windflow.common.malloc import keep_freed_memory
    from windflow.v1 import windflow_pb2 as pb

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    keep_freed_memory()  # as the worker does
    model = load_model(model_id)
    info = model.info
    encoding = Encoding(pb.FRAME_FORMAT_RGB, info.width, info.height, 85)
    rng = random.Random(0)
    out: dict[str, float] = {}
    for n in sizes:
        states = [model.new_state(i) for i in range(n)]
        chunks = [states[i : i + info.max_batch] for i in range(0, n, info.max_batch)]

        def batch(chunk: list[Any]) -> None:
            controls = [Control(action=rng.randrange(len(info.actions))) for _ in chunk]
            size = len(chunk)
            step_and_encode(
                model,
                chunk,
                controls,
                info.default_steps,
                [encoding] * size,
                [Capture.NONE] * size,
            )

        for chunk in chunks:  # warm up
            batch(chunk)
        made, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for chunk in chunks:
                batch(chunk)
                made += len(chunk)
        out[str(n)] = round(made / (time.perf_counter() - t0), 1)
    return out


# ---- the envs, over the mesh ----


def run_envs(
    gateway: str, token: str, model: str, n: int, seconds: float
) -> tuple[float, dict[str, int]]:
    """(env steps per second, frames by batch size) of a vector env of ``n`` lockstep
    envs stepped with random actions for ``seconds`` (after a few steps to warm up)."""
    from windflow.env import WindflowVectorEnv

    envs = WindflowVectorEnv(n, model, gateway, token)
    try:
        envs.action_space.seed(n)
        envs.reset(seed=1000 * n)
        for _ in range(5):
            envs.step(envs.action_space.sample())
        envs.frames_by_batch_size.clear()
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            envs.step(envs.action_space.sample())
            steps += 1
        rate = n * steps / (time.perf_counter() - t0)
        sizes = {str(k): v for k, v in sorted(envs.frames_by_batch_size.items())}
    finally:
        envs.close()
    return rate, sizes


def drive_envs(
    gateway: str,
    token: str,
    model: str,
    n: int,
    stepping: threading.Event,
    stop: threading.Event,
    done: list[float],
) -> str | None:
    """Step a vector env of ``n`` envs with random actions until ``stop``, appending each
    step's end (``time.monotonic()``) to ``done``; ``stepping`` is set once reset. Returns
    the error that stopped it early, if any (a step that timed out: starved)."""
    from windflow.env import WindflowVectorEnv

    envs = WindflowVectorEnv(n, model, gateway, token)
    try:
        envs.action_space.seed(n)
        envs.reset(seed=2000 * n)
        stepping.set()
        while not stop.is_set():
            try:
                envs.step(envs.action_space.sample())
            except TimeoutError as exc:
                return str(exc)
            done.append(time.monotonic())
    finally:
        stepping.set()
        envs.close()
    return None


class Reader:
    """An interactive session's frames' arrival times, read in the background."""

    def __init__(self, live: Any) -> None:
        self.arrivals: list[int] = []
        self._task = asyncio.create_task(self._pump(live))

    async def _pump(self, live: Any) -> None:
        async for frame in live.frames():
            self.arrivals.append(frame.received_us)

    async def fps_over(self, seconds: float) -> tuple[float, float, float]:
        """(frames per second delivered, start, end (``time.monotonic()``)) over the next
        ``seconds``."""
        start, t0 = len(self.arrivals), time.monotonic()
        await asyncio.sleep(seconds)
        got, t1 = self.arrivals[start:], time.monotonic()
        if self._task.done():
            self._task.result()
        if len(got) < 2:
            return 0.0, t0, t1
        return (len(got) - 1) / ((got[-1] - got[0]) / 1e6), t0, t1

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def measure_isolation(gateway: str, token: str, model: str, seconds: float) -> dict[str, Any]:
    from windflow.sdk import Client

    done: list[float] = []
    stepping, stop = threading.Event(), threading.Event()
    async with Client(gateway, token=token) as client:
        info = await client.create_session(model, seed=9, **INTERACTIVE)
        live = await client.attach(info)
        reader = Reader(live)
        envs: asyncio.Task[str | None] | None = None
        try:
            await reader.fps_over(1.0)  # under way
            alone, _, _ = await reader.fps_over(seconds)
            progress(f"interactive alone: {alone:.2f} fps; starting {ISOLATION_ENVS} envs")
            envs = asyncio.create_task(
                asyncio.to_thread(
                    drive_envs, gateway, token, model, ISOLATION_ENVS, stepping, stop, done
                )
            )
            await asyncio.to_thread(stepping.wait)
            await asyncio.sleep(0.5)  # under way
            beside, t0, t1 = await reader.fps_over(seconds)
        finally:
            stop.set()
            await reader.aclose()
            await live.aclose()
            with contextlib.suppress(Exception):
                await client.close_session(info.session_id)
        # (after the interactive session: a starved env's step ends once it is gone)
        error = await envs if envs is not None else None
    made = sum(1 for t in done if t0 <= t <= t1) * ISOLATION_ENVS
    return {
        "interactive_isolation": round(beside / alone, 3) if alone else None,
        "interactive_fps_alone": round(alone, 2),
        "interactive_fps_beside": round(beside, 2),
        "lockstep_steps_per_s_beside": round(made / (t1 - t0), 1),
        "lockstep_error_beside": error,
    }


REFUSAL_WAIT_S = 3.0
"""How long a call refused for the router's fps headroom is retried."""
FALLBACK_FPS = 1.0
"""The fps of the fork phase's lockstep sessions when 16 forks at the native fps are
refused for headroom: the router counts a lockstep session's fps against a worker's
headroom (docs/simulation.md, "Open problems"); a lockstep session has no clock, so its
fps changes neither its frames nor its speed (only its billed seconds)."""


async def _retried(call: Any) -> tuple[Any, float]:
    """(``await call()``, its ms), retried while the router refuses it for fps headroom
    ("can meet"), for ``REFUSAL_WAIT_S``; only the call that succeeds is timed."""
    from windflow.errors import ResourceExhausted

    deadline = time.monotonic() + REFUSAL_WAIT_S
    while True:
        t0 = time.perf_counter()
        try:
            out = await call()
        except ResourceExhausted as err:
            if "can meet" not in err.message or time.monotonic() > deadline:
                raise
            await asyncio.sleep(min(err.retry_after_s or 0.5, 0.5))
            continue
        return out, (time.perf_counter() - t0) * 1000.0


async def _forks(client: Any, model: str, n_actions: int, reps: int, fps: float) -> dict[str, Any]:
    """fork_many timed ``reps`` times from frame ``FORK_AT`` of a lockstep session of
    ``fps``, then rollouts checked against fresh sessions."""
    spec = {**LOCKSTEP, "fps": fps}
    history = [(k * 7) % n_actions for k in range(FORK_AT)]
    parent, _ = await _retried(lambda: client.create_session(model, seed=11, **spec))
    parent_id = parent.session_id
    try:
        live = await client.attach(parent, controls=list(enumerate(history)))
        try:
            made = [f async for f in live.frames(limit=FORK_AT)]
        finally:
            await live.aclose()
        assert [f.index for f in made] == list(range(FORK_AT))
        times = []
        for _ in range(reps):
            branches, ms = await _retried(lambda: client.fork_many(parent_id, FORK_AT, FORKS))
            times.append(ms)
            await asyncio.gather(*(client.close_session(b.session_id) for b in branches))
        scripts = [[(b + k) % n_actions for k in range(6)] for b in range(FORKS)]
        results, _ = await _retried(lambda: client.rollouts(parent_id, FORK_AT, scripts))
        exact = all(len(r) == len(s) for r, s in zip(results, scripts, strict=True))
        for script, frames in list(zip(scripts, results, strict=True))[:4]:
            fresh, _ = await _retried(lambda: client.create_session(model, seed=11, **spec))
            whole = list(enumerate([*history, *script]))
            stream = await client.attach(fresh, controls=whole)
            try:
                again = [f async for f in stream.frames(limit=len(whole))]
            finally:
                await stream.aclose()
                await client.close_session(fresh.session_id)
            exact = exact and [f.frame.data for f in again[FORK_AT:]] == [
                f.frame.data for f in frames
            ]
    finally:
        with contextlib.suppress(Exception):
            await client.close_session(parent_id)
    return {
        "fork_many_ms": round(statistics.median(times), 1),
        "fork_many_ms_all": [round(t, 1) for t in times],
        "fork_many_branches": FORKS,
        "fork_many_bit_exact": exact,
    }


async def measure_forks(gateway: str, token: str, model: str, reps: int) -> dict[str, Any]:
    """``_forks`` at the model's native fps; where the router refuses the forks for fps
    headroom, again at ``FALLBACK_FPS`` (and the refusal is in the result)."""
    from windflow.errors import ResourceExhausted
    from windflow.sdk import Client

    async with Client(gateway, token=token) as client:
        served = {m.model_id: m for m in await client.list_models()}
        n_actions = len(served[model].actions)
        try:
            out = await _forks(client, model, n_actions, reps, 0.0)
            return {**out, "fork_many_session_fps": served[model].fps}
        except ResourceExhausted as err:
            if "can meet" not in err.message:
                raise
            progress(f"fork_many refused at the native fps: {err.message}; again at 1 fps")
            out = await _forks(client, model, n_actions, reps, FALLBACK_FPS)
            return {
                **out,
                "fork_many_session_fps": FALLBACK_FPS,
                "fork_many_refused_at_native_fps": err.message,
            }


def goals(result: dict[str, Any]) -> dict[str, bool]:
    ratio = result.get("env_ratio_min")
    isolation = result.get("interactive_isolation")
    fork_ms = result.get("fork_many_ms")
    return {
        "env_ratio_min>=0.8": ratio is not None and ratio >= GOALS["env_ratio_min"],
        "interactive_isolation>=0.95": isolation is not None
        and isolation >= GOALS["interactive_isolation"],
        # (not one of the goals: isolation means little if the lockstep envs were
        # starved meanwhile)
        "lockstep_share_beside>=0.5": (result.get("lockstep_share_beside") or 0) >= 0.5,
        "fork_many_ms<=100": fork_ms is not None and fork_ms <= GOALS["fork_many_ms"],
        "fork_many_bit_exact": bool(result.get("fork_many_bit_exact")),
    }


async def measure(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    from windflow.infra import Stack, StackConfig

    config = StackConfig(
        state_dir=state_dir,
        workers=1,
        bridge=False,
        worker_args=(*bench_results.stack_worker_args(args), "--capacity", str(args.capacity)),
    )
    result: dict[str, Any] = {}
    async with Stack(config) as stack:
        gateway, token = stack.gateway_address, stack.token
        progress(f"stack up, gateway {gateway}; the raw model in this process")
        raw = await asyncio.to_thread(measure_raw, args.model, SIZES, args.seconds)
        progress(f"raw steps/s {raw}")
        env: dict[str, float] = {}
        sizes: dict[str, dict[str, int]] = {}
        for n in SIZES:
            rate, by_size = await asyncio.to_thread(
                run_envs, gateway, token, args.model, n, args.seconds
            )
            env[str(n)], sizes[str(n)] = round(rate, 1), by_size
            progress(f"{n} envs: {rate:.1f} env steps/s (raw {raw[str(n)]}); batches {by_size}")
        ratio = {k: round(env[k] / raw[k], 3) for k in env}
        result |= {
            "env_steps_per_s": env,
            "raw_steps_per_s": raw,
            "env_ratio": ratio,
            "env_ratio_min": min(ratio[k] for k in ("8", "32")),
            "env_batch_sizes": sizes,
        }
        progress(f"interactive isolation, {args.isolation_seconds:g} s windows")
        result |= await measure_isolation(gateway, token, args.model, args.isolation_seconds)
        result["lockstep_share_beside"] = round(
            result["lockstep_steps_per_s_beside"] / env[str(ISOLATION_ENVS)], 3
        )
        progress(f"isolation {result['interactive_isolation']}; fork_many x{args.fork_reps}")
        result |= await measure_forks(gateway, token, args.model, args.fork_reps)
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["goals"] = goals(result)
    return result


def _main(args: argparse.Namespace) -> int:
    from windflow.infra import StackFailed

    started = dt.datetime.now(dt.UTC)
    machine_desc = bench_results.machine()
    state_dir = Path(tempfile.mkdtemp(prefix="windflow-bench-sim-"))
    try:
        result = asyncio.run(measure(args, state_dir))
    except StackFailed as exc:
        progress(f"the stack failed: {exc}; logs in {state_dir}")
        return 1
    progress("\n" + bench_results.key_value_table(result))
    if args.json and args.out_dir:
        fields = {"model": args.model, "worker_args": args.worker_arg, "result": result}
        path = bench_results.write(args.out_dir, "sim", started, machine_desc, fields)
        progress(f"results written to {path}")
    print(json.dumps(result), flush=True)
    if not result["fork_many_bit_exact"]:
        progress(f"the branches were not bit-exact; logs in {state_dir}")
        return 1
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0
