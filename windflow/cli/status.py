"""``windflow status``: the mesh at a glance: workers, router replicas, sessions.

It reads etcd (``--etcd``, or WINDFLOW_ETCD), as an operator's tool does: the workers'
registrations (region, models, load, sessions, draining), the routers' election (which
replica leads), the sessions' records and placements (model, tenant, where each is); and
asks every worker for its sessions (``Worker.ListSessions``: fps, quality rung, head frame,
attached). A table by default; ``--json`` one JSON object; ``--watch`` the table again
every second, in place, until Ctrl-C (with ``--json``: one object per line).
Exit status: 0, or 1 when etcd cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from etcd3aio import Etcd3Client, EtcdError, prefix_range_end

from windflow.common import env, etcd, grpc_util, names
from windflow.errors import WindflowError
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

WORKER_TIMEOUT_S = 2.0
"""How long a worker gets to list its sessions (one that does not answer shows none)."""
WATCH_EVERY_S = 1.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"
"""ANSI: cursor home and clear the screen (the first frame of ``--watch``)."""
HOME = "\x1b[H"
CLEAR_LINE_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"


def register(sub: Any) -> None:
    status = sub.add_parser("status", help="workers, routers and sessions at a glance")
    add_etcd_argument(status)
    status.add_argument("--watch", action="store_true", help="refresh every second, in place")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=run)


def add_etcd_argument(parser: argparse.ArgumentParser) -> None:
    default = env.ETCD_ENDPOINT.get()
    parser.add_argument("--etcd", default=default, required=default is None, help="etcd host:port")


def run(args: argparse.Namespace) -> int:
    return connected(args.etcd, lambda client: _status(client, as_json=args.json, watch=args.watch))


def connected(endpoint: str, action: Callable[[Etcd3Client], Awaitable[int]]) -> int:
    """Run ``action`` with an etcd client; 1 with the reason on stderr when etcd (or a
    service) refuses; 0 on Ctrl-C."""

    async def go() -> int:
        client = await etcd.connect(endpoint)
        try:
            return await action(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        return 0
    except WindflowError as exc:
        print(f"windflow: {exc.code}: {exc.message}", file=sys.stderr)
    except EtcdError as exc:
        print(f"windflow: UNAVAILABLE: etcd at {endpoint}: {exc}", file=sys.stderr)
    return 1


async def _status(
    client: Etcd3Client, *, as_json: bool, watch: bool, out: TextIO = sys.stdout
) -> int:
    first = True
    while True:
        snap = await snapshot(client)
        if as_json:
            print(json.dumps(snap), file=out, flush=True)
        elif not watch:
            print(render(snap), file=out)
        else:
            heading = f"windflow status  {time.strftime('%H:%M:%S')}  (Ctrl-C to stop)"
            out.write(refresh(f"{heading}\n\n{render(snap)}", first=first))
            out.flush()
        if not watch:
            return 0
        first = False
        await asyncio.sleep(WATCH_EVERY_S)


def refresh(text: str, *, first: bool) -> str:
    """``text`` drawn over the previous frame (pure): cursor home (the whole screen cleared
    on the first frame), each line cleared to its end, then everything below it cleared, so
    that a shorter table leaves nothing of the longer one behind."""
    lines = text.rstrip("\n").split("\n")
    body = "".join(f"{line}{CLEAR_LINE_END}\n" for line in lines)
    return (CLEAR_SCREEN if first else HOME) + body + CLEAR_BELOW


# ---- what it reads ----


async def snapshot(client: Etcd3Client, *, include_closed: bool = False) -> dict[str, Any]:
    """The mesh now, as one JSON-able object: ``workers``, ``routers`` (the leader first),
    ``leader``, ``sessions`` (closed ones only with ``include_closed``) and ``unix_ms``."""
    from services.router.leader import candidates

    workers, routers, (records, placements) = await asyncio.gather(
        etcd.list_workers(client), candidates(client), _sessions_prefix(client)
    )
    workers.sort(key=lambda w: w.worker_id)
    statuses = await _worker_sessions(workers)
    return {
        "unix_ms": int(time.time() * 1000),
        "workers": [_worker(w) for w in workers],
        "routers": [{"address": a, "leader": i == 0} for i, a in enumerate(routers)],
        "leader": routers[0] if routers else "",
        "sessions": session_rows(records, placements, statuses, include_closed=include_closed),
    }


async def _sessions_prefix(
    client: Etcd3Client,
) -> tuple[list[pb.Session], dict[str, internal_pb2.PlacementRecord]]:
    """Every session record and placement (one range read of the sessions prefix)."""
    prefix = names.SESSIONS_PREFIX.encode()
    response = await etcd.kv(client).get(prefix, prefix_range_end(prefix))
    records, placements = [], {}
    for item in response.kvs:
        session_id, _, kind = item.key.decode()[len(names.SESSIONS_PREFIX) :].partition("/")
        if kind == "record":
            records.append(pb.Session.FromString(item.value))
        elif kind == "placement":
            placements[session_id] = internal_pb2.PlacementRecord.FromString(item.value)
    return records, placements


async def _worker_sessions(
    workers: Sequence[internal_pb2.WorkerInfo],
) -> dict[str, tuple[str, internal_pb2.SessionStatus]]:
    """Each session a worker holds: (its worker, its status)."""

    async def listed(worker: internal_pb2.WorkerInfo) -> list[internal_pb2.SessionStatus]:
        async with grpc_util.channel(worker.address) as channel:
            try:
                reply = await internal_pb2_grpc.WorkerStub(channel).ListSessions(
                    internal_pb2.ListSessionsRequest(), timeout=WORKER_TIMEOUT_S
                )
            except Exception:  # (a worker gone, stalled or draining: it shows none)
                return []
        return list(reply.sessions)

    replies = await asyncio.gather(*(listed(w) for w in workers))
    return {
        status.session_id: (worker.worker_id, status)
        for worker, statuses in zip(workers, replies, strict=True)
        for status in statuses
    }


def _worker(info: internal_pb2.WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": info.worker_id,
        "address": info.address,
        "region": info.region,
        "models": [m.model_id for m in info.models],
        "sessions": info.sessions,
        "capacity": info.capacity,
        "load": round(info.load, 3),
        "utilization": round(info.utilization, 3),
        "draining": info.draining,
        "frames_dropped": info.frames_dropped,
        "deadline_misses": info.deadline_misses,
    }


def session_rows(
    records: Sequence[pb.Session],
    placements: dict[str, internal_pb2.PlacementRecord],
    statuses: dict[str, tuple[str, internal_pb2.SessionStatus]],
    *,
    include_closed: bool = False,
) -> list[dict[str, Any]]:
    """One row per session (pure): its record, its placement, and what its worker says.
    ``state``: streaming (a controller attached), placed (held, no client), parked,
    moving (placed on a worker that does not hold it yet), or the record's (closed ...)."""
    rows = []
    for record in sorted(records, key=lambda r: (r.tenant, r.created_unix_ms, r.session_id)):
        session_id = record.session_id
        closed = record.state in (pb.SESSION_STATE_CLOSED, pb.SESSION_STATE_FAILED)
        if closed and not include_closed:
            continue
        placement = placements.get(session_id)
        held = statuses.get(session_id)
        row: dict[str, Any] = {
            "session_id": session_id,
            "tenant": record.tenant,
            "model": record.spec.model_id,
            "state": pb.SessionState.Name(record.state).removeprefix("SESSION_STATE_").lower(),
            "worker": "",
            "fps": record.spec.fps,
            "level": 0,
            "steps": record.spec.steps,
            "head_frame": int(record.head_frame),
            "attached": False,
            "dropped": 0,
            "deadline_misses": 0,
        }
        if held is not None and not closed:
            worker_id, status = held
            row.update(
                state="streaming" if status.attached else "placed",
                worker=worker_id,
                fps=round(status.fps, 3),
                level=status.level,
                steps=status.steps,
                head_frame=int(status.head_frame),
                attached=status.attached,
                dropped=int(status.dropped),
                deadline_misses=int(status.deadline_misses),
            )
        elif placement is not None and placement.parked and not closed:
            row.update(state="parked", head_frame=int(placement.parked_head))
        elif placement is not None and not closed:
            row.update(state="moving", worker=placement.worker_id)
        rows.append(row)
    return rows


# ---- the table ----


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart (pure)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def render(snap: dict[str, Any]) -> str:
    """The ``windflow status`` table of a ``snapshot`` (pure)."""
    out: list[str] = []
    workers = snap.get("workers", [])
    out.append(f"WORKERS ({len(workers)})")
    if workers:
        out += table(
            ("ID", "REGION", "ADDRESS", "MODELS", "SESSIONS", "LOAD", "UTIL", "STATE"),
            [
                (
                    w["worker_id"],
                    w["region"],
                    w["address"],
                    ",".join(w["models"]),
                    f"{w['sessions']}/{w['capacity']}",
                    f"{w['load']:.2f}",
                    f"{w['utilization']:.2f}",
                    "draining" if w["draining"] else "serving",
                )
                for w in workers
            ],
        )
    routers = snap.get("routers", [])
    out += ["", f"ROUTERS ({len(routers)})"]
    if routers:
        out += table(
            ("ADDRESS", "ROLE"),
            [(r["address"], "leader" if r["leader"] else "follower") for r in routers],
        )
    else:
        out.append("(none campaigning: no router replica runs)")
    sessions = snap.get("sessions", [])
    out += ["", f"SESSIONS ({len(sessions)})"]
    if sessions:
        out += session_table(sessions)
    return "\n".join(out)


def session_table(sessions: Sequence[dict[str, Any]]) -> list[str]:
    return table(
        ("ID", "TENANT", "MODEL", "STATE", "WORKER", "FPS", "RUNG", "STEPS", "HEAD", "DROPPED"),
        [
            (
                s["session_id"],
                s["tenant"] or "-",
                s["model"],
                s["state"],
                s["worker"] or "-",
                f"{s['fps']:g}",
                str(s["level"]),
                str(s["steps"]),
                str(s["head_frame"]),
                str(s["dropped"]),
            )
            for s in sessions
        ],
    )
