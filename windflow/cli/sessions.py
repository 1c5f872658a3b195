"""``windflow sessions list|close``: the mesh's sessions, for an operator.

``list`` reads etcd (``--etcd``, or WINDFLOW_ETCD) and asks each worker for its sessions,
as ``windflow status`` does: model, tenant, state, worker, fps, quality rung, head frame.
``close ID`` closes a session through the session service's internal API
(``--session-service HOST:PORT``: ``windflow up`` writes it to <state dir>/services.json),
whatever its tenant, as the gateway's CloseSession would for its owner: its worker lets it
go, its placement goes, its record says CLOSED. Exit status: 0 done, 1 refused
(``windflow: CODE: message`` on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from etcd3aio import Etcd3Client

from windflow.cli.status import add_etcd_argument, connected, session_table, snapshot
from windflow.common import grpc_util
from windflow.errors import WindflowError
from windflow.v1 import internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

CLOSE_TIMEOUT_S = 30.0


def register(sub: Any) -> None:
    sessions = sub.add_parser("sessions", help="list or close the mesh's sessions")
    actions = sessions.add_subparsers(dest="sessions_command", required=True)

    listing = actions.add_parser("list", help="every live session (all tenants)")
    add_etcd_argument(listing)
    listing.add_argument("--tenant", default=None, help="only this tenant's")
    listing.add_argument("--all", action="store_true", help="closed sessions too")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.set_defaults(func=_list)

    close = actions.add_parser("close", help="close a session (any tenant's)")
    close.add_argument("session_id")
    close.add_argument("--session-service", required=True, help="session service host:port")
    close.set_defaults(func=_close)


def _list(args: argparse.Namespace) -> int:
    async def action(client: Etcd3Client) -> int:
        rows = (await snapshot(client, include_closed=args.all))["sessions"]
        if args.tenant is not None:
            rows = [r for r in rows if (r["tenant"] or "-") == args.tenant]
        if args.json:
            print(json.dumps(rows))
        elif rows:
            print("\n".join(session_table(rows)))
        else:
            print("no sessions", file=sys.stderr)
        return 0

    return connected(args.etcd, action)


def _close(args: argparse.Namespace) -> int:
    try:
        session = asyncio.run(close_session(args.session_service, args.session_id))
    except WindflowError as exc:
        print(f"windflow: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "session_id": session.session_id,
                "state": pb.SessionState.Name(session.state).removeprefix("SESSION_STATE_").lower(),
                "head_frame": int(session.head_frame),
                "tenant": session.tenant,
            }
        )
    )
    return 0


async def close_session(session_service: str, session_id: str) -> pb.Session:
    """Close ``session_id`` through the session service (``SessionStore.Close``)."""
    async with grpc_util.channel(session_service) as channel:
        return await grpc_util.call(
            internal_pb2_grpc.SessionStoreStub(channel).Close(
                pb.CloseSessionRequest(session_id=session_id), timeout=CLOSE_TIMEOUT_S
            )
        )
