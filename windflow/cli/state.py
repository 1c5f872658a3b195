"""``windflow fork|rewind|replay``: a session's durable state from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from google.protobuf import json_format

from windflow.cli.play import VideoWriter
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb


def _summary(session: pb.Session) -> str:
    data = json_format.MessageToDict(session, preserving_proto_field_name=True)
    data.pop("model", None)
    return json.dumps(data)


def register(sub: Any) -> None:
    fork = sub.add_parser("fork", help="a new session continuing from a frame of another")
    fork.add_argument("--gateway", required=True)
    fork.add_argument("session_id")
    fork.add_argument("at_frame", type=int)
    fork.set_defaults(func=lambda a: _run(_fork(a)))

    rewind = sub.add_parser("rewind", help="continue a session from an earlier frame")
    rewind.add_argument("--gateway", required=True)
    rewind.add_argument("session_id")
    rewind.add_argument("to_frame", type=int)
    rewind.set_defaults(func=lambda a: _run(_rewind(a)))

    replay = sub.add_parser("replay", help="re-render frames [from, to) of a session")
    replay.add_argument("--gateway", required=True)
    replay.add_argument("session_id")
    replay.add_argument("from_frame", type=int)
    replay.add_argument("to_frame", type=int)
    replay.add_argument("--out", default=None, help="write the frames to this .mp4")
    replay.set_defaults(func=lambda a: _run(_replay(a)))


def _run(coro: Any) -> int:
    result: int = asyncio.run(coro)
    return result


async def _fork(args: argparse.Namespace) -> int:
    async with Client(args.gateway) as client:
        print(_summary(await client.fork(args.session_id, args.at_frame)))
    return 0


async def _rewind(args: argparse.Namespace) -> int:
    async with Client(args.gateway) as client:
        print(_summary(await client.rewind(args.session_id, args.to_frame)))
    return 0


async def _replay(args: argparse.Namespace) -> int:
    async with Client(args.gateway) as client:
        session = await client.get_session(args.session_id)
        writer = (
            VideoWriter(args.out, session.spec.fps, session.spec.width, session.spec.height)
            if args.out
            else None
        )
        count = 0
        try:
            async for frame in client.replay(args.session_id, args.from_frame, args.to_frame):
                count += 1
                if writer is not None:
                    writer.write(frame.rgb())
        finally:
            if writer is not None:
                writer.close()
    print(json.dumps({"session_id": args.session_id, "frames": count, "out": args.out}))
    return 0
