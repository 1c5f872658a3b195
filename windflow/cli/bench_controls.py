"""``windflow bench controls``: prompts, poses and frames in, measured (docs/controls.md).

On its own stack (one worker serving ``wan-causal-tiny``, ``matrix-game-2-tiny`` and
``windflow-restyle``, the gateway authenticating with the stack's token, no bridge), every
service a process:

1. ``receipt_ms_p50``: ``--receipts`` controls sent with ``send_confirmed`` on a restyle
   session at its native fps, each from the send to its ``ControlReceipt``'s arrival;
   ``rtt_ms_p50``: as many ``GetSession`` calls on that attached session, the public call
   nearest a stream round trip (client -> gateway -> the session's record in etcd, its
   placement and its worker's status -> back: the receipt's hops and a few more, so it
   bounds a round trip from above). ``receipt_over_rtt_ms`` is the difference (the goal:
   <= 1 ms);
2. ``prompt_switch_ms_p50``: ``--switch-reps`` times, two ``wan-causal-tiny`` sessions of
   one seed run side by side; at a random frame one of them gets a new prompt, stamped
   for two frames ahead (confirmed by its receipt). The first frame where the two differ is
   the first made under the new prompt; the figure runs from the send to that frame's
   arrival (the wait for the model's next chunk boundary included, a prompt applies from
   there: ``prompt_switch_frames_p50`` counts the frames from the stamp to it);
   ``prompt_switch_extra_ms_p50``: that frame's arrival less the reference session's same
   frame (the new prompt's encoding and the KV re-cache, as the client sees them);
3. ``v2v_fps``, ``v2v_input_dropped``: a ``windflow-restyle`` session at its native fps
   fed one input frame (a moving test pattern, JPEG) per frame it makes, stamped just in
   time, over ``--v2v-seconds``; then ``v2v_overfed_*``: the same fed twice as fast by a
   sender of its own (the newest frame wins, the rest are counted as dropped and the
   output rate holds);
4. ``replay_bit_exact_all_kinds``: the frames delivered to a prompt-switching, a posed and
   a frames-in session (raw RGB) equal those ``Replay`` re-renders from the control log.

Goals (``goals``): ``receipt_over_rtt_ms`` <= 1, ``v2v_fps`` >= 0.95 of the model's native
fps, bit-exact replays. Progress goes to stderr; with ``--json`` one JSON line ends the
output and the record goes under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from windflow.cli import bench_results

PROMPT_MODEL = "wan-causal-tiny"
POSE_MODEL = "matrix-game-2-tiny"
V2V_MODEL = "windflow-restyle"
MODELS = (PROMPT_MODEL, POSE_MODEL, V2V_MODEL)
PROMPTS = ("a quiet harbour at dawn", "a neon city in the rain")
GOAL_RECEIPT_OVER_RTT_MS = 1.0
GOAL_V2V_FPS_SHARE = 0.95


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "controls",
        help="prompts, poses and frames in: receipts, prompt switches, video-to-video",
        description=__doc__,
    )
    parser.add_argument("--receipts", type=int, default=60, help="controls timed")
    parser.add_argument("--switch-reps", type=int, default=5, help="prompt switches timed")
    parser.add_argument("--v2v-seconds", type=float, default=8.0, help="each v2v run")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--out-dir", default="bench/results", help="'' to record nothing")
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra argument for the worker"
    )
    parser.set_defaults(func=_main, model=",".join(MODELS))


def progress(text: str) -> None:
    print(f"[controls] {text}", file=sys.stderr, flush=True)


def p50(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def pattern(t: int, width: int, height: int) -> np.ndarray:
    """A moving test pattern (frames in): a gradient and a disc that travels."""
    y, x = np.mgrid[0:height, 0:width]
    cx = width / 2 + width / 3 * math.cos(t / 12)
    cy = height / 2 + height / 3 * math.sin(t / 9)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) / 6) ** 2
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, (t * 3) % 256)], -1)
    rgb[disc] = (250, 240, 40)
    return rgb.astype(np.uint8)


async def measure_receipts(client: Any, count: int) -> dict[str, Any]:
    from windflow.common import telemetry

    info = await client.create_session(V2V_MODEL, seed=1, format="rgb", quality="fixed")
    live = await client.attach(info)
    receipts: list[float] = []
    rtts: list[float] = []
    reader = asyncio.create_task(_drain(live))
    try:
        for i in range(count):
            sent = telemetry.now_us()
            await live.send_confirmed(i % len(info.model.actions), frame_index=live.next_index + 2)
            receipts.append((telemetry.now_us() - sent) / 1000.0)
            t0 = time.perf_counter()
            await client.get_session(info.session_id)
            rtts.append((time.perf_counter() - t0) * 1000.0)
            await asyncio.sleep(0.02)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await live.aclose()
        await client.close_session(info.session_id)
    receipt, rtt = p50(receipts), p50(rtts)
    return {
        "receipt_ms_p50": receipt,
        "rtt_ms_p50": rtt,
        "receipt_over_rtt_ms": round(receipt - rtt, 2) if receipt and rtt else None,
    }


async def _drain(live: Any) -> None:
    async for _ in live.frames():
        pass


async def _frames_until(
    live: Any, last: int, into: dict[int, Any], mark: tuple[int, asyncio.Event] | None = None
) -> None:
    """Read frames up to ``last`` into ``into``; ``mark``: (index, event) set once that
    frame is in."""
    async for frame in live.frames():
        into[frame.index] = frame
        if mark is not None and frame.index >= mark[0]:
            mark[1].set()
        if frame.index >= last:
            return


async def measure_prompt_switch(client: Any, reps: int) -> dict[str, Any]:
    """Two sessions of one seed side by side; one switches its prompt at a random frame."""

    rng = random.Random(7)
    switch_ms: list[float] = []
    switch_frames: list[float] = []
    extra_ms: list[float] = []
    exact = True
    for rep in range(reps):
        pair = [
            await client.create_session(PROMPT_MODEL, seed=rep, format="rgb", quality="fixed")
            for _ in "ab"
        ]
        lives = [await client.attach(info, window=64) for info in pair]
        at = rng.randrange(10, 30)
        span = at + 40
        got: list[dict[int, Any]] = [{}, {}]
        near = asyncio.Event()
        readers = [
            asyncio.create_task(_frames_until(lives[0], span, got[0], (at, near))),
            asyncio.create_task(_frames_until(lives[1], span, got[1])),
        ]
        try:
            await asyncio.wait_for(near.wait(), 120)
            sent, index = await _switch(lives[0], PROMPTS[rep % 2])
            await asyncio.wait_for(asyncio.gather(*readers), 120)
            first = next(
                (
                    i
                    for i in range(index, span + 1)
                    if not np.array_equal(got[0][i].rgb(), got[1][i].rgb())
                ),
                None,
            )
            if first is None:
                progress(f"rep {rep}: no frame changed after the switch at {index}")
                continue
            switch_ms.append((got[0][first].received_us - sent) / 1000.0)
            switch_frames.append(first - index)
            # what the switch added to that frame: its arrival beside the reference's
            extra_ms.append((got[0][first].received_us - got[1][first].received_us) / 1000.0)
            progress(f"rep {rep}: switch at {index}, first new frame {first}")
            if rep == reps - 1:
                exact &= await replay_equal(client, pair[0].session_id, got[0], span + 1)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for live, info in zip(lives, pair, strict=True):
                await live.aclose()
                await client.close_session(info.session_id)
    return {
        "prompt_switch_ms_p50": p50(switch_ms),
        "prompt_switch_frames_p50": p50(switch_frames),
        "prompt_switch_extra_ms_p50": p50(extra_ms),
        "prompt_replay_exact": exact,
    }


async def _switch(live: Any, prompt: str) -> tuple[int, int]:
    """Send ``prompt`` stamped a little ahead of the frames received (a worker that just
    made a chunk's frames in a burst is ahead of them: stamped further when refused as in
    the past); (when it was sent, the frame it applies from)."""
    from windflow.common import telemetry
    from windflow.errors import InvalidArgument

    ahead = 3
    while True:
        sent = telemetry.now_us()
        try:
            receipt = await live.send_confirmed(prompt=prompt, frame_index=live.next_index + ahead)
        except InvalidArgument as err:
            if "in the past" not in err.message or ahead > 48:
                raise
            ahead *= 2
            continue
        return sent, int(receipt.frame_index)


async def replay_equal(client: Any, session_id: str, frames: dict[int, Any], upto: int) -> bool:
    """Frames [0, upto) as delivered equal those Replay re-renders."""
    replayed = {f.index: f.frame.data async for f in client.replay(session_id, 0, upto)}
    return len(replayed) == upto and all(frames[i].frame.data == replayed[i] for i in range(upto))


async def measure_pose(client: Any) -> dict[str, Any]:
    from windflow.sdk.client import make_control

    info = await client.create_session(POSE_MODEL, seed=3, format="rgb", quality="fixed")
    spec = info.model.controls.pose
    poses = [
        make_control(at, 1, pose=[share * c.max for c in spec.components])
        for at, share in ((0, 0.5), (13, -1.0), (30, 0.25))
    ]
    live = await client.attach(info, window=64, controls=poses)
    got: dict[int, Any] = {}
    reader = asyncio.create_task(_frames_until(live, 47, got))
    try:
        await asyncio.wait_for(reader, 120)
        return {"pose_replay_exact": await replay_equal(client, info.session_id, got, 48)}
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await live.aclose()
        await client.close_session(info.session_id)


async def measure_v2v(client: Any, seconds: float, overfeed: float) -> dict[str, Any]:
    """A restyle session fed one frame per frame made (``overfeed`` 0), or by a sender of
    its own at ``overfeed`` times the model's fps."""
    from windflow.sdk.client import make_control

    info = await client.create_session(V2V_MODEL, seed=5, format="rgb", quality="fixed")
    schema = info.model.controls.input_frame
    width, height, fps = schema.width, schema.height, info.spec.fps
    first = make_control(0, 1, frame=pattern(0, width, height))
    live = await client.attach(info, window=8, controls=[first])
    frames: dict[int, Any] = {}
    sent = 1

    async def feed_closed_loop(index: int) -> None:
        nonlocal sent
        await live.send(index % 3, frame_index=index, frame=pattern(sent, width, height))
        sent += 1

    async def feed_fast() -> None:
        nonlocal sent
        period = 1.0 / (fps * overfeed)
        while True:
            await live.send(1, frame=pattern(sent, width, height))
            sent += 1
            await asyncio.sleep(period)

    feeder = asyncio.create_task(feed_fast()) if overfeed else None
    try:
        start = time.perf_counter()
        first_us = 0
        async for frame in live.frames():
            frames[frame.index] = frame
            first_us = first_us or frame.received_us
            if time.perf_counter() - start >= seconds:
                break
            if feeder is None:
                await feed_closed_loop(await live.just_in_time())
        last = max(frames)
        span_s = (frames[last].received_us - first_us) / 1e6
        delivered_fps = (len(frames) - 1) / span_s if span_s > 0 else 0.0
        result = {
            "fps": round(delivered_fps, 2),
            "native_fps": fps,
            "sent": sent,
            "dropped": int(frames[last].frame.input_dropped_total),
        }
        if not overfeed:
            upto = min(frames) + len(frames)
            result["replay_exact"] = min(frames) == 0 and await replay_equal(
                client, info.session_id, frames, upto
            )
        return result
    finally:
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        await live.aclose()
        await client.close_session(info.session_id)


def goals(result: dict[str, Any]) -> dict[str, bool]:
    over = result.get("receipt_over_rtt_ms")
    fps, native = result.get("v2v_fps") or 0.0, result.get("v2v_native_fps") or 0.0
    return {
        "receipt_within_rtt_plus_1ms": over is not None and over <= GOAL_RECEIPT_OVER_RTT_MS,
        "v2v_sustains_native_fps": native > 0 and fps >= GOAL_V2V_FPS_SHARE * native,
        "replay_bit_exact_all_kinds": bool(result.get("replay_bit_exact_all_kinds")),
    }


async def measure(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    from windflow.infra import Stack, StackConfig
    from windflow.sdk import Client

    config = StackConfig(
        state_dir=state_dir,
        workers=1,
        bridge=False,
        worker_args=bench_results.stack_worker_args(args),
    )
    result: dict[str, Any] = {}
    async with Stack(config) as stack, Client(stack.gateway_address, token=stack.token) as c:
        progress(f"stack up, gateway {stack.gateway_address}; receipts x{args.receipts}")
        result |= await measure_receipts(c, args.receipts)
        progress(f"receipt p50 {result['receipt_ms_p50']} ms, rtt p50 {result['rtt_ms_p50']} ms")
        result |= await measure_prompt_switch(c, args.switch_reps)
        progress(f"prompt switch p50 {result['prompt_switch_ms_p50']} ms; poses")
        result |= await measure_pose(c)
        progress(f"v2v at the model's rate, {args.v2v_seconds:g} s")
        v2v = await measure_v2v(c, args.v2v_seconds, 0.0)
        progress(f"v2v {v2v}; fed twice as fast")
        over = await measure_v2v(c, args.v2v_seconds, 2.0)
        progress(f"v2v overfed {over}")
    result |= {
        "v2v_fps": v2v["fps"],
        "v2v_native_fps": v2v["native_fps"],
        "v2v_input_sent": v2v["sent"],
        "v2v_input_dropped": v2v["dropped"],
        "v2v_overfed_fps": over["fps"],
        "v2v_overfed_sent": over["sent"],
        "v2v_overfed_dropped": over["dropped"],
    }
    result["replay_bit_exact_all_kinds"] = bool(
        result.pop("prompt_replay_exact")
        and result.pop("pose_replay_exact")
        and v2v["replay_exact"]
    )
    result["goals"] = goals(result)
    return result


def _main(args: argparse.Namespace) -> int:
    return bench_results.run_stack_bench(
        "controls",
        args,
        lambda state_dir: measure(args, state_dir),
        bench_results.key_value_table,
        lambda result: bool(result["replay_bit_exact_all_kinds"]),
    )
