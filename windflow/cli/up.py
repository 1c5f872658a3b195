"""``windflow up``: run the whole mesh on this machine (etcd, NATS, every service).

Prints one line containing "ready" and the first gateway's ``host:port`` once the stack
serves (``windflow ready: gateway HOST:PORT gateways=HOST:PORT,... (...)``: every gateway
after ``gateways=``, the first one first), then runs until Ctrl-C or SIGTERM (exit 0 after
a clean stop) or until the stack fails (a child kept dying, or could not start: exit 1
with the reason on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from windflow.cli.serve import add_reclaim_arguments
from windflow.infra import BinaryNotFound, Stack, StackConfig, StackFailed
from windflow.infra.stack import DEFAULT_SERVICE_COMMAND

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STACK_FAILED = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "up",
        help="run etcd, NATS and every service on this machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workers", type=_non_negative_int, default=2, help="number of workers (default 2)"
    )
    parser.add_argument(
        "--gateways",
        type=_positive_int,
        default=1,
        help="number of gateways, each on its own port (default 1); a client that knows "
        "several resumes its streams through another while one restarts",
    )
    parser.add_argument(
        "--routers",
        type=_positive_int,
        default=1,
        help="router replicas (default 1): they elect a leader; another takes over when it dies",
    )
    parser.add_argument(
        "--regions",
        type=parse_regions,
        default=None,
        help="workers per region, e.g. us-east:2,eu-west:1 (instead of --workers)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where logs, etcd data and the JetStream store go "
        "(default: a temporary dir, removed after a clean stop)",
    )
    parser.add_argument("--region", default=None, help="region of the router and workers")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface the gateways listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="the first gateway's port (default: a free one; the others always get free ones)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no authentication: any caller may do anything (default: a development key "
        "and token are made, the token written to <state dir>/token)",
    )
    parser.add_argument(
        "--no-bridge",
        dest="bridge",
        action="store_false",
        help="no browser bridge (HTTP and WebSocket; on by default)",
    )
    parser.add_argument(
        "--models",
        default="windflow-world,windflow-restyle",
        help="comma-separated model ids every worker serves (default: %(default)s; "
        "`windflow models` lists the registered ones)",
    )
    add_reclaim_arguments(parser)
    parser.add_argument(
        "--service-command",
        default=shlex.join(DEFAULT_SERVICE_COMMAND),
        help="command that runs one service; the kind and its flags are appended "
        "(default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.worker.models.registry import MODEL_FACTORIES  # (no model is loaded)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_FACTORIES]
    if not models or unknown:
        print(
            f"windflow up: unknown model(s) {', '.join(unknown) or '(none given)'}; "
            f"registered: {', '.join(sorted(MODEL_FACTORIES))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    temporary = args.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="windflow-")) if temporary else args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    workers, worker_regions = args.regions or (args.workers, {})
    config = StackConfig(
        state_dir=state_dir.resolve(),
        workers=workers,
        worker_regions=worker_regions,
        routers=args.routers,
        gateways=args.gateways,
        host=args.host,
        gateway_port=args.port,
        region=args.region,
        service_command=tuple(shlex.split(args.service_command)),
        insecure=args.insecure,
        bridge=args.bridge,
        worker_args=("--models", ",".join(models)),
        session_args=(
            "--close-unattached-s",
            str(args.close_unattached_s),
            "--park-after-s",
            str(args.park_after_s),
        ),
    )
    code = asyncio.run(run_stack(config))
    if temporary:
        if code == EXIT_OK:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            print(f"windflow: logs kept in {state_dir / 'logs'}", file=sys.stderr, flush=True)
    return code


async def run_stack(config: StackConfig, *, out: TextIO = sys.stdout) -> int:
    """Start the stack, announce it on ``out`` and run until a signal or a failure."""
    try:
        stack = Stack(config)
    except BinaryNotFound as exc:
        print(f"windflow: {exc}", file=sys.stderr, flush=True)
        return EXIT_STACK_FAILED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, signum, stop)
    stopped = asyncio.create_task(stop.wait(), name="up:signal")
    starting = asyncio.create_task(stack.start(), name="up:start")
    running: asyncio.Task[None] | None = None
    try:
        await asyncio.wait({stopped, starting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal arrived while starting
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StackFailed):
                await starting
            return EXIT_OK
        try:
            starting.result()
        except StackFailed as exc:
            print(f"windflow: {exc}", file=sys.stderr, flush=True)
            return EXIT_STACK_FAILED
        print(ready_line(stack), file=out, flush=True)
        print(access_line(stack), file=sys.stderr, flush=True)
        print(metrics_line(stack), file=sys.stderr, flush=True)
        running = asyncio.create_task(stack.wait(), name="up:stack")
        await asyncio.wait({stopped, running}, return_when=asyncio.FIRST_COMPLETED)
        if running.done() and (failure := stack.failure) is not None:
            print(f"windflow: the stack stopped: {failure}", file=sys.stderr, flush=True)
            return EXIT_STACK_FAILED
        return EXIT_OK
    finally:
        logger.info("stopping the windflow stack")
        await stack.aclose()
        owned = [task for task in (stopped, starting, running) if task is not None]
        for task in owned:
            task.cancel()
        await asyncio.gather(*owned, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        logger.info("windflow stack stopped")


def ready_line(stack: Stack) -> str:
    """What ``up`` prints once the stack serves. Scripts take the ``host:port`` after
    "gateway " (the first gateway, as when there was only one) or the comma-separated list
    after "gateways=" (every gateway), and the state dir before the closing parenthesis."""
    config = stack.config
    return (
        f"windflow ready: gateway {stack.gateway_address} "
        f"gateways={','.join(stack.gateway_addresses)} "
        f"routers={stack.router_addresses} "
        f"({config.workers} worker{'s' if config.workers != 1 else ''}, "
        f"state in {config.state_dir})"
    )


def metrics_line(stack: Stack) -> str:
    """Where each service serves Prometheus metrics (``GET /metrics``)."""
    where = " ".join(f"{name}={addr}" for name, addr in stack.metrics_addresses.items())
    return (
        f"windflow: metrics: {where} (GET /metrics on each; every address is in "
        f"{stack.config.state_dir / 'services.json'})"
    )


def access_line(stack: Stack) -> str:
    """How clients authenticate to the stack (loudly, when they need not)."""
    if stack.config.insecure:
        return (
            "windflow: WARNING: INSECURE: the gateways authenticate no one; any caller may "
            "create, attach to, fork or close any session (--insecure)"
            + (f"; play in a browser at {stack.bridge_url}" if stack.bridge_url else "")
        )
    token = stack.config.state_dir / "token"
    page = (
        f"; play in a browser at {stack.bridge_url}?token={stack.token}" if stack.bridge_url else ""
    )
    return (
        f"windflow: a development token (tenant dev) is in {token}; clients read it from "
        f"WINDFLOW_TOKEN: export WINDFLOW_TOKEN=$(cat {token}){page}"
    )


def parse_regions(text: str) -> tuple[int, dict[str, str]]:
    """``us-east:2,eu-west:1`` -> (3 workers, {worker-1: us-east, worker-2: us-east,
    worker-3: eu-west})."""
    regions: dict[str, str] = {}
    for part in text.split(","):
        name, _, count = part.strip().partition(":")
        if not name or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"expected REGION:COUNT[,REGION:COUNT...], got {text!r}"
            )
        for _ in range(int(count)):
            regions[f"worker-{len(regions) + 1}"] = name
    return len(regions), regions


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    if stop.is_set():
        logger.warning("%s again: already stopping", signal.Signals(signum).name)
    else:
        logger.info("%s: stopping", signal.Signals(signum).name)
    stop.set()


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
