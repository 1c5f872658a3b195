"""``windflow serve <service>``: run one Windflow service in this process."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from services.gateway.config import Quotas
from services.session.config import ReclaimPolicy, RetentionPolicy
from windflow.common import env

if TYPE_CHECKING:
    from services.worker.config import WorkerConfig


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:0", help="gRPC listen address host:port")
    parser.add_argument("--etcd", default=env.ETCD_ENDPOINT.get(), help="etcd host:port")
    parser.add_argument("--nats", default=env.NATS_URL.get(), help="NATS URL nats://host:port")
    parser.add_argument(
        "--otlp-endpoint", default=None, help="OTLP/gRPC collector of traces and metrics"
    )
    parser.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (empty, the default: off)",
    )


def add_reclaim_arguments(parser: argparse.ArgumentParser) -> ReclaimPolicy:
    """The reclaiming limits a user sets (``windflow serve session``, ``windflow up``);
    returns the defaults."""
    reclaim = ReclaimPolicy()
    parser.add_argument(
        "--close-unattached-s",
        type=float,
        default=reclaim.unattached_s,
        help="close a session no client attached to within this (0: never; default %(default)s)",
    )
    parser.add_argument(
        "--park-after-s",
        type=float,
        default=reclaim.park_after_s,
        help="park a session without a client this long: checkpointed, slot freed, back on "
        "its next attach (0: never; default %(default)s)",
    )
    return reclaim


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("serve", help="run one service")
    services = parser.add_subparsers(dest="service", required=True)

    router = services.add_parser("router", help="placement and admission")
    _common(router)
    router.add_argument("--region", default=env.REGION.get("local"))
    router.add_argument(
        "--election-ttl", type=int, default=2, help="leader lease TTL, seconds (replicas)"
    )
    router.add_argument(
        "--election-heartbeat", type=float, default=0.5, help="leader lease renewal, seconds"
    )
    router.add_argument("--advertise", default=None, help="address replicas forward to")
    router.add_argument(
        "--rebalance-every-s",
        type=float,
        default=0.0,
        help="move live sessions off a worker whose load stands out, a round this often (0: never)",
    )
    router.add_argument(
        "--rebalance-cooldown-s",
        type=float,
        default=30.0,
        help="a session moved by rebalancing stays at least this long",
    )
    router.set_defaults(func=_run_router)

    session = services.add_parser("session", help="session metadata, fork and rewind")
    _common(session)
    session.add_argument(
        "--router", required=True, help="router host:port (replicas: comma-separated)"
    )
    reclaim = add_reclaim_arguments(session)
    session.add_argument(
        "--reclaim-every-s",
        type=float,
        default=reclaim.every_s,
        help="how often idle sessions are looked for (0: no reclaiming)",
    )
    retention = RetentionPolicy()
    session.add_argument(
        "--park-retention-s",
        type=float,
        default=retention.parked_retention_s,
        help="close a session parked this long (0: never)",
    )
    session.add_argument(
        "--closed-retention-s",
        type=float,
        default=retention.closed_retention_s,
        help="delete a closed session's checkpoints, log and record this long after (0: never)",
    )
    session.add_argument(
        "--keep-recent-s",
        type=float,
        default=retention.recent_s,
        help="keep every checkpoint of this many seconds before a session's head; older "
        "ones are thinned (one a minute to an hour back, then one every ten minutes)",
    )
    session.add_argument(
        "--retention-every-s",
        type=float,
        default=retention.every_s,
        help="how often checkpoints are thinned, sessions parked too long closed and closed "
        "ones deleted (0: never)",
    )
    session.set_defaults(func=_run_session)

    worker = services.add_parser("worker", help="hosts sessions and runs models")
    _common(worker)
    worker.add_argument("--worker-id", required=True)
    worker.add_argument("--advertise", default=None, help="address others dial (default: bound)")
    worker.add_argument("--region", default=env.REGION.get("local"))
    worker.add_argument("--models", default="windflow-world", help="comma-separated model ids")
    worker.add_argument("--capacity", type=int, default=8, help="sessions at once")
    worker.add_argument("--lease-ttl", type=int, default=3, help="etcd lease TTL, seconds")
    worker.add_argument("--heartbeat", type=float, default=1.0, help="lease keep-alive, seconds")
    worker.add_argument(
        "--checkpoint-every", type=int, default=48, help="frames between checkpoints (0: never)"
    )
    worker.add_argument(
        "--memory-snapshot-every",
        type=int,
        default=2,
        help="frames between the in-memory snapshots that forks and rewinds on this worker "
        "restore from (0: never)",
    )
    worker.add_argument(
        "--memory-snapshots",
        type=int,
        default=32,
        help="in-memory snapshots kept per session (the newest)",
    )
    worker.add_argument(
        "--memory-snapshot-mb",
        type=float,
        default=16.0,
        help="memory per session for its in-memory snapshots (fewer, spaced wider, where "
        "the model's state is large; 0: no budget)",
    )
    worker.add_argument(
        "--step-threads",
        type=int,
        default=int(env.STEP_THREADS.get("1") or 1),
        help="torch threads for the model step",
    )
    worker.add_argument(
        "--model-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each model in its own process (default) or in the worker's",
    )
    worker.add_argument(
        "--pipeline-depth",
        type=int,
        default=2,
        help="batches a model host holds at once (2: the next one waits behind the one it "
        "runs; 1: one at a time)",
    )
    worker.add_argument(
        "--admission",
        choices=("fps", "slots"),
        default="fps",
        help="admit by predicted fps headroom (default) or by session slots only",
    )
    worker.add_argument(
        "--target-utilization", type=float, default=0.9, help="admission ceiling (0, 1]"
    )
    worker.add_argument(
        "--recheck-idle-s",
        type=float,
        default=5.0,
        help="while idle, re-time each model this often and rescale its step costs (0: never)",
    )
    worker.add_argument(
        "--placement-check-s",
        type=float,
        default=2.0,
        help="check this often that each session held is still placed here (0: never)",
    )
    worker.add_argument(
        "--router",
        default="",
        help="the router a stopping worker asks to migrate its sessions away (empty: none)",
    )
    worker.add_argument(
        "--drain-deadline-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long live migration may take before the rest goes as in a crash",
    )
    worker.add_argument(
        "--memory-budget-mb", type=float, default=0.0, help="per-model batch memory budget"
    )
    worker.set_defaults(func=_run_worker)

    gateway = services.add_parser("gateway", help="the public API")
    _common(gateway)
    gateway.add_argument(
        "--router", required=True, help="router host:port (replicas: comma-separated)"
    )
    gateway.add_argument("--session-service", required=True, help="session service host:port")
    gateway.add_argument(
        "--insecure",
        action="store_true",
        help="no authentication: any caller may do anything (local use only)",
    )
    quotas = Quotas()
    gateway.add_argument(
        "--tenant-max-sessions",
        type=int,
        default=quotas.max_sessions,
        help="live sessions a tenant may hold at once (0: no quota)",
    )
    gateway.add_argument(
        "--tenant-creates-per-s",
        type=float,
        default=quotas.creates_per_s,
        help="sessions a tenant may create per second, in bursts of twice that (0: no quota)",
    )
    gateway.set_defaults(func=_run_gateway)

    bridge = services.add_parser("bridge", help="HTTP and WebSocket for browsers")
    _common(bridge)
    bridge.add_argument(
        "--gateway", required=True, help="the gateway host:port (several: comma-separated)"
    )
    bridge.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="a STUN/TURN server for WebRTC (stun:HOST:PORT, turn:USER:CREDENTIAL@HOST:PORT); "
        "repeatable; none by default",
    )
    bridge.add_argument(
        "--ice-loopback",
        choices=("auto", "always", "never"),
        default="auto",
        help="offer 127.0.0.1 as a WebRTC host candidate: where there is no other address "
        "(auto, the default), always, or never",
    )
    bridge.add_argument(
        "--max-webrtc-peers",
        type=int,
        default=64,
        help="live WebRTC peer connections at most (default %(default)s)",
    )
    bridge.set_defaults(func=_run_bridge)


def _run_bridge(args: argparse.Namespace) -> int:
    from services.bridge.config import BridgeConfig
    from services.bridge.main import run
    from services.bridge.webrtc import ice_server

    try:
        for url in args.ice_server:
            ice_server(url)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    config = BridgeConfig(
        gateway=args.gateway,
        listen=args.listen,
        ice_servers=tuple(args.ice_server),
        ice_loopback=args.ice_loopback,
        max_webrtc_peers=args.max_webrtc_peers,
        metrics_listen=args.metrics_listen,
        otlp_endpoint=args.otlp_endpoint,
    )
    return asyncio.run(run(config))


def _need(args: argparse.Namespace) -> None:
    if not args.etcd or not args.nats:
        raise SystemExit("--etcd and --nats are required (or WINDFLOW_ETCD / WINDFLOW_NATS)")


def _run_router(args: argparse.Namespace) -> int:
    from services.router.config import RouterConfig
    from services.router.main import run

    _need(args)
    config = RouterConfig(
        etcd=args.etcd,
        nats=args.nats,
        listen=args.listen,
        region=args.region,
        otlp_endpoint=args.otlp_endpoint,
        election_ttl_s=args.election_ttl,
        election_heartbeat_s=args.election_heartbeat,
        advertise=args.advertise,
        rebalance_every_s=args.rebalance_every_s,
        rebalance_cooldown_s=args.rebalance_cooldown_s,
        metrics_listen=args.metrics_listen,
    )
    return asyncio.run(run(config))


def _run_session(args: argparse.Namespace) -> int:
    from services.session.config import SessionServiceConfig
    from services.session.main import run

    _need(args)
    config = SessionServiceConfig(
        etcd=args.etcd,
        nats=args.nats,
        router=args.router,
        listen=args.listen,
        reclaim=ReclaimPolicy(
            every_s=args.reclaim_every_s,
            unattached_s=args.close_unattached_s,
            park_after_s=args.park_after_s,
        ),
        retention=RetentionPolicy(
            every_s=args.retention_every_s,
            recent_s=args.keep_recent_s,
            parked_retention_s=args.park_retention_s,
            closed_retention_s=args.closed_retention_s,
        ),
        otlp_endpoint=args.otlp_endpoint,
        metrics_listen=args.metrics_listen,
    )
    return asyncio.run(run(config))


def _run_worker(args: argparse.Namespace) -> int:
    from services.worker.main import run

    _need(args)
    return asyncio.run(run(worker_config(args)))


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's config from ``serve worker``'s arguments (its defaults are the
    flags' defaults; a unit test holds them to WorkerConfig's own)."""
    from services.worker.config import WorkerConfig

    return WorkerConfig(
        etcd=args.etcd,
        nats=args.nats,
        worker_id=args.worker_id,
        listen=args.listen,
        advertise=args.advertise,
        region=args.region,
        models=tuple(m for m in args.models.split(",") if m),
        capacity=args.capacity,
        lease_ttl_s=args.lease_ttl,
        heartbeat_s=args.heartbeat,
        checkpoint_every=args.checkpoint_every,
        memory_snapshot_every=args.memory_snapshot_every,
        memory_snapshots=args.memory_snapshots,
        memory_snapshot_mb=args.memory_snapshot_mb,
        step_threads=args.step_threads,
        model_process=args.model_process,
        pipeline_depth=args.pipeline_depth,
        otlp_endpoint=args.otlp_endpoint,
        fps_admission=args.admission == "fps",
        target_utilization=args.target_utilization,
        recheck_idle_s=args.recheck_idle_s,
        placement_check_s=args.placement_check_s,
        memory_budget_mb=args.memory_budget_mb,
        router=args.router,
        drain_deadline_s=args.drain_deadline_s,
        metrics_listen=args.metrics_listen,
    )


def _run_gateway(args: argparse.Namespace) -> int:
    from services.gateway.config import GatewayConfig
    from services.gateway.main import run

    _need(args)
    config = GatewayConfig(
        etcd=args.etcd,
        nats=args.nats,
        router=args.router,
        session_service=args.session_service,
        listen=args.listen,
        insecure=args.insecure,
        quotas=Quotas(
            max_sessions=args.tenant_max_sessions, creates_per_s=args.tenant_creates_per_s
        ),
        otlp_endpoint=args.otlp_endpoint,
        metrics_listen=args.metrics_listen,
    )
    return asyncio.run(run(config))
