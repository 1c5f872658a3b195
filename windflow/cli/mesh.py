"""``windflow migrate|drain``: move live sessions between workers (docs/migration.md).

Both talk to the router (``--router``, printed by ``windflow up``). ``migrate`` prints the
move as one JSON line; ``drain`` prints a progress line per session moved and ends with a
JSON summary. Exit status: 0 done, 1 refused (the reason on stderr), 2 a drain that left
sessions behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from windflow.common import grpc_util
from windflow.v1 import internal_pb2, internal_pb2_grpc


def register(sub: Any) -> None:
    migrate = sub.add_parser("migrate", help="move a live session to another worker")
    migrate.add_argument("--router", required=True, help="the router's host:port")
    migrate.add_argument("session_id")
    where = migrate.add_mutually_exclusive_group()
    where.add_argument("--to", default="", help="the target worker (default: the router picks)")
    where.add_argument("--region", default="", help="any worker in this region")
    migrate.set_defaults(func=lambda a: asyncio.run(_migrate(a)))

    drain = sub.add_parser("drain", help="migrate every session off a worker")
    drain.add_argument("--router", required=True, help="the router's host:port")
    drain.add_argument("worker_id")
    drain.add_argument("--deadline-s", type=float, default=0.0, help="give up after (0: never)")
    drain.add_argument("--concurrency", type=int, default=0, help="moves at once (0: default)")
    drain.add_argument("--undo", action="store_true", help="let the worker take new sessions again")
    drain.set_defaults(func=lambda a: asyncio.run(_drain(a)))


def _json(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _refused(exc: grpc.aio.AioRpcError) -> int:
    print(f"windflow: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


async def _migrate(args: argparse.Namespace) -> int:
    request = internal_pb2.MigrateRequest(
        session_id=args.session_id, to_worker_id=args.to, region=args.region, reason="cli"
    )
    async with grpc_util.channel(args.router) as channel:
        try:
            result = await internal_pb2_grpc.RouterStub(channel).Migrate(request)
        except grpc.aio.AioRpcError as exc:
            return _refused(exc)
    print(_json(result), flush=True)
    return 0


async def _drain(args: argparse.Namespace) -> int:
    request = internal_pb2.DrainRequest(
        worker_id=args.worker_id,
        deadline_s=args.deadline_s,
        concurrency=args.concurrency,
        undo=args.undo,
    )
    last = internal_pb2.DrainProgress()
    async with grpc_util.channel(args.router) as channel:
        try:
            async for progress in internal_pb2_grpc.RouterStub(channel).Drain(request):
                last = progress
                if progress.done:
                    break
                moved = progress.last
                line = (
                    f"{progress.migrated + progress.failed}/{progress.sessions}"
                    f" {moved.session_id} -> {moved.to_worker_id} at frame {moved.cutover_frame}"
                    f" (hand-off {moved.handoff_ms:.0f} ms)"
                    if moved.session_id
                    else progress.detail or f"{progress.sessions} session(s) to move"
                )
                print(f"drain {args.worker_id}: {line}", file=sys.stderr, flush=True)
        except grpc.aio.AioRpcError as exc:
            return _refused(exc)
    print(_json(last), flush=True)
    return 0 if last.remaining == 0 and last.failed == 0 else 2
