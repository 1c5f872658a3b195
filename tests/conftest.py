"""Shared fixtures: real etcd and nats-server processes on free loopback ports.

``etcd_server`` and ``nats_server`` are session-scoped: each starts once, on first use,
and stops at the end of the run. They are plain (sync) fixtures around the async
launchers, so tests of any event-loop scope can use their addresses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from windflow.infra.etcd import EtcdServer
from windflow.infra.nats import NatsServer
from windflow.infra.ports import free_port as _free_port

# A stand-in for `windflow serve <kind>`: serves gRPC health (overall "" SERVING) on
# --listen and ignores the other service flags. Options make it misbehave on purpose.
FAKE_SERVICE_SOURCE = """
import argparse, asyncio, os, signal, subprocess, sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve(args):
    if args.exit_before_ready is not None:
        print(f"fake {args.kind}: failing on purpose", flush=True)
        sys.exit(args.exit_before_ready)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.grandchild_pid_file:
        sleeper = subprocess.Popen(["sleep", "600"])
        with open(args.grandchild_pid_file, "a") as f:
            f.write(f"{sleeper.pid}\\n")
    if args.pid_file:
        with open(args.pid_file, "a") as f:
            f.write(f"{os.getpid()}\\n")
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(args.listen)
    await server.start()
    status = health_pb2.HealthCheckResponse.NOT_SERVING if args.never_ready else (
        health_pb2.HealthCheckResponse.SERVING
    )
    await servicer.set("", status)
    print(f"fake {args.kind} serving on {args.listen} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    if not args.ignore_sigterm:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.exit_after)
    except asyncio.TimeoutError:
        print(f"fake {args.kind}: exiting with {args.exit_code} on purpose", flush=True)
        os._exit(args.exit_code)
    await server.stop(0.2)
    print(f"fake {args.kind}: stopped", flush=True)


parser = argparse.ArgumentParser()
parser.add_argument("kind", nargs="?", default="fake")
parser.add_argument("--listen", required=True)
parser.add_argument("--pid-file")
parser.add_argument("--grandchild-pid-file")
parser.add_argument("--exit-after", type=float, default=None)
parser.add_argument("--exit-code", type=int, default=3)
parser.add_argument("--exit-before-ready", type=int, default=None)
parser.add_argument("--ignore-sigterm", action="store_true")
parser.add_argument("--never-ready", action="store_true")
asyncio.run(serve(parser.parse_known_args()[0]))
"""


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    return _free_port()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real single-member etcd for the whole run; ``.endpoint`` is "127.0.0.1:PORT"."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-state"))
    asyncio.run(server.start())
    try:
        yield server
    finally:
        asyncio.run(server.aclose())


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server with JetStream for the whole run; ``.url`` is "nats://..."."""
    server = NatsServer(tmp_path_factory.mktemp("nats-state"))
    asyncio.run(server.start())
    try:
        yield server
    finally:
        asyncio.run(server.aclose())


@pytest.fixture(scope="session")
def fake_service_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a Python script that stands in for ``windflow serve <kind>`` (see above)."""
    path = tmp_path_factory.mktemp("fake-service") / "fake_service.py"
    path.write_text(FAKE_SERVICE_SOURCE)
    return path


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """torch on one thread for a module (``pytest.mark.usefixtures``): tiny tensors gain
    nothing from a second thread, and lose a lot to a busy core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
