"""The transport floor under ``bench runtime``'s overhead: two bare gRPC hops.

A frame reaches a client through two gRPC hops, worker -> gateway -> client, each in
a process of its own. This module runs that chain with nothing else in it: a *source*
process streams payloads of a frame's size at the session's fps (each stamped with the
wall clock as it leaves), a *relay* process forwards them (stamping again) and the
calling process reads them (``Frames``). A control goes the other way first: on
``Echo``, the caller sends a small message through the relay and the source answers
each with a frame-sized payload after a model step's time (idle, as a worker waits for
its step): four hops, a control-to-frame with no model; the wait is not counted.
Servers and channels are the runtime's own (``grpc_util.ServiceServer``,
``grpc_util.channel``); payloads are bytes, with no protobuf message, no model and no
session. What the hops cost here is what any gateway + worker design pays on the same
machine before doing any work of its own: ``bench runtime`` measures it in the same run
as its overhead and control-to-frame, and reports both.

    python -m windflow.cli.bench_floor source --listen 127.0.0.1:0 --bytes 12288 --fps 24 \
        [--answer-after-ms 6]
    python -m windflow.cli.bench_floor relay --listen 127.0.0.1:0 --upstream HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from windflow.common import grpc_util, telemetry

SERVICE = "windflow.bench.Floor"
FRAMES = f"/{SERVICE}/Frames"
ECHO = f"/{SERVICE}/Echo"
STAMP = struct.Struct("<q")
MAX_FRAMES = 1 << 20
CONTROL_GAP = (2.0, 5.0)
"""Controls go 2-5 frame intervals apart (uniformly drawn): here and in ``bench runtime``."""


def _identity(data: bytes) -> bytes:
    return data


def _register(frames: Any, echo: Any) -> Any:
    """A ``ServiceServer.add`` register function for the two streaming methods."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Frames": grpc.unary_stream_rpc_method_handler(frames, _identity, _identity),
            "Echo": grpc.stream_stream_rpc_method_handler(echo, _identity, _identity),
        },
    )
    return lambda _servicer, server: server.add_generic_rpc_handlers([handler])


async def _serve(listen: str, frames: Any, echo: Any) -> None:
    server = grpc_util.ServiceServer(listen)
    server.add(_register(frames, echo), None, SERVICE)
    address = await server.start()
    await server.set_serving()
    print(f"listening on {address}", flush=True)
    await server.wait()


async def _source(listen: str, size: int, fps: float, answer_after_s: float) -> None:
    """Stream ``size``-byte payloads at ``fps``, on an absolute schedule, stamped as
    they leave (the first 8 bytes); answer each control ``answer_after_s`` after it came,
    stamped with when it came and when the answer left (the first 16 bytes)."""
    body = bytes(max(0, size - STAMP.size))

    async def frames(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        count = STAMP.unpack(request)[0] if len(request) == STAMP.size else MAX_FRAMES
        interval = 1.0 / fps
        due = time.monotonic()
        for _ in range(min(count, MAX_FRAMES)):
            due += interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield STAMP.pack(telemetry.now_us()) + body

    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            came = telemetry.now_us()
            await asyncio.sleep(answer_after_s)
            yield STAMP.pack(came) + STAMP.pack(telemetry.now_us()) + body[STAMP.size :]

    await _serve(listen, frames, echo)


async def _relay(listen: str, upstream: str) -> None:
    """Forward the source's stream, each payload with the relay's stamp appended."""
    channel = grpc_util.channel(upstream)
    frames_call = channel.unary_stream(
        FRAMES, request_serializer=_identity, response_deserializer=_identity
    )
    echo_call = channel.stream_stream(
        ECHO, request_serializer=_identity, response_deserializer=_identity
    )

    async def frames(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for payload in frames_call(request):
            yield payload + STAMP.pack(telemetry.now_us())

    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        call = echo_call()

        async def forward() -> None:
            async for message in requests:
                await call.write(message)
            await call.done_writing()

        writer = asyncio.create_task(forward())
        try:
            async for payload in call:
                yield payload
        finally:
            writer.cancel()
            call.cancel()

    try:
        await _serve(listen, frames, echo)
    finally:
        await channel.close()


@dataclass(slots=True)
class Floor:
    """Leg times (ms) through the bare chain, after the warm-up."""

    first_hop_ms: list[float]
    """source stamp -> relay stamp (the worker -> gateway leg)."""
    second_hop_ms: list[float]
    """relay stamp -> read here (the gateway -> client leg)."""
    round_trip_ms: list[float]
    """A control sent here -> the source's answer read here, less the source's wait
    between the two (``Echo``: four hops)."""

    @property
    def total_ms(self) -> list[float]:
        return [a + b for a, b in zip(self.first_hop_ms, self.second_hop_ms, strict=True)]


async def measure(
    size: int,
    fps: float,
    seconds: float,
    warmup_s: float,
    log_dir: Path,
    answer_after_ms: float = 0.0,
) -> Floor:
    """Start a source and a relay (separate processes, free loopback ports); read
    ``warmup_s + seconds`` of payloads through them, then send controls for as long,
    ``CONTROL_GAP`` frame intervals apart (as ``bench runtime`` sends its own); the legs
    after the warm-up."""
    from windflow.infra import ChildSpec, ManagedProcess, free_ports
    from windflow.infra.ports import LOOPBACK, address

    source_port, relay_port = free_ports(2)
    source_addr, relay_addr = address(LOOPBACK, source_port), address(LOOPBACK, relay_port)
    me = (sys.executable, "-m", __name__)
    specs = [
        ChildSpec(
            "floor-source",
            (
                *me,
                "source",
                "--listen",
                source_addr,
                "--bytes",
                str(size),
                "--fps",
                str(fps),
                "--answer-after-ms",
                str(answer_after_ms),
            ),
            health_address=source_addr,
        ),
        ChildSpec(
            "floor-relay",
            (*me, "relay", "--listen", relay_addr, "--upstream", source_addr),
            health_address=relay_addr,
        ),
    ]
    procs = [ManagedProcess(s, log_dir / f"{s.name}.log") for s in specs]
    try:
        for p in procs:
            p.start()
            await p.wait_ready()
        channel = grpc_util.channel(relay_addr)
        try:
            frames = channel.unary_stream(
                FRAMES, request_serializer=_identity, response_deserializer=_identity
            )
            count = int((seconds + warmup_s) * fps)
            first, second = [], []
            async for payload in frames(STAMP.pack(count)):
                got = telemetry.now_us()
                if len(payload) != size + STAMP.size:  # the relay's stamp on the source's
                    raise RuntimeError(f"a {len(payload)}-byte payload; {size} were sent")
                sent = STAMP.unpack_from(payload, 0)[0]
                relayed = STAMP.unpack_from(payload, len(payload) - STAMP.size)[0]
                first.append((relayed - sent) / 1000.0)
                second.append((got - relayed) / 1000.0)
            rounds = await _round_trips(channel, fps, seconds, warmup_s)
        finally:
            await channel.close()
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                await p.stop()
    skip = int(warmup_s * fps)
    return Floor(first[skip:], second[skip:], rounds)


async def _round_trips(
    channel: grpc.aio.Channel, fps: float, seconds: float, warmup_s: float
) -> list[float]:
    """Round trips of controls sent for ``warmup_s + seconds``; those of the warm-up
    are not kept."""
    call = channel.stream_stream(
        ECHO, request_serializer=_identity, response_deserializer=_identity
    )()
    rng = random.Random(0)
    out = []
    warm = time.monotonic() + warmup_s
    stop = warm + seconds
    try:
        while time.monotonic() < stop:
            await asyncio.sleep(rng.uniform(*CONTROL_GAP) / fps)
            kept = time.monotonic() >= warm
            sent = telemetry.now_us()
            await call.write(STAMP.pack(sent))
            answer = await call.read()
            got = telemetry.now_us()
            if not isinstance(answer, bytes):
                raise RuntimeError("the echo stream ended early")
            came, left = STAMP.unpack_from(answer, 0)[0], STAMP.unpack_from(answer, STAMP.size)[0]
            if kept:
                out.append((got - sent - (left - came)) / 1000.0)
    finally:
        call.cancel()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m windflow.cli.bench_floor")
    sub = parser.add_subparsers(dest="role", required=True)
    source = sub.add_parser("source", help="stream payloads at a fixed rate")
    source.add_argument("--listen", required=True)
    source.add_argument("--bytes", type=int, required=True)
    source.add_argument("--fps", type=float, required=True)
    source.add_argument(
        "--answer-after-ms", type=float, default=0.0, help="a control's answer waits this long"
    )
    relay = sub.add_parser("relay", help="forward a source's stream")
    relay.add_argument("--listen", required=True)
    relay.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    if args.role == "source":
        if args.bytes < 2 * STAMP.size or not 0 < args.fps <= 10_000:
            parser.error("--bytes must be >= 16 and --fps in (0, 10000]")
        if not 0 <= args.answer_after_ms <= 10_000:
            parser.error("--answer-after-ms must be in [0, 10000]")
        asyncio.run(_source(args.listen, args.bytes, args.fps, args.answer_after_ms / 1000.0))
    else:
        asyncio.run(_relay(args.listen, args.upstream))


if __name__ == "__main__":
    main()
