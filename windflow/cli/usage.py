"""``windflow usage``: billed streaming seconds per session and per tenant, from the ledger.

It reads the ledger in etcd (``--etcd``, or WINDFLOW_ETCD) that the session service keeps
from the workers' usage records (windflow/access/usage.py, docs/access.md). A table by
default; ``--json`` one JSON object; ``--csv`` one row per session then per tenant.
``--since`` counts from then (an ISO time, or an age: ``90s``, ``15m``, ``2h``, ``1d``),
at minute granularity.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import sys
import time
from typing import Any

from windflow.access.usage import Ledger, SessionUsage, by_tenant
from windflow.common import env, etcd

AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: Any) -> None:
    usage = sub.add_parser("usage", help="billed streaming seconds per session and tenant")
    default = env.ETCD_ENDPOINT.get()
    usage.add_argument("--etcd", default=default, required=default is None, help="etcd host:port")
    usage.add_argument("--tenant", default=None, help="only this tenant's sessions")
    usage.add_argument("--since", default=None, help="ISO time or age (90s, 15m, 2h, 1d)")
    form = usage.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON object")
    form.add_argument("--csv", action="store_true", help="CSV rows")
    usage.set_defaults(func=lambda a: asyncio.run(_usage(a)))


def since_unix_ms(text: str | None, now: float | None = None) -> int:
    """``--since`` as unix ms (0: from the start)."""
    if not text:
        return 0
    now = time.time() if now is None else now
    unit = text[-1].lower()
    if unit in AGES and text[:-1].replace(".", "", 1).isdigit():
        return int((now - float(text[:-1]) * AGES[unit]) * 1000)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(
            f"windflow usage: --since {text!r} is neither an ISO time nor an age"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def rows(sessions: list[SessionUsage], since_ms: int) -> list[dict[str, Any]]:
    out = []
    for usage in sorted(sessions, key=lambda u: (u.tenant, u.first_unix_ms)):
        seconds = usage.seconds_since(since_ms) if since_ms else usage.seconds
        if since_ms and not seconds:
            continue
        out.append(
            {
                "session_id": usage.session_id,
                "tenant": usage.tenant or "-",
                "model_id": usage.model_id,
                "seconds": round(seconds, 3),
                "frames": usage.frames,
                "fps": usage.fps,
                "steps": usage.steps,
                "bytes_out": usage.bytes_out,
                "compute_s": round(usage.compute_ms / 1000.0, 3),
                "tokens": sorted(usage.tokens),
                "last_unix_ms": usage.last_unix_ms,
            }
        )
    return out


async def _usage(args: argparse.Namespace) -> int:
    since_ms = since_unix_ms(args.since)
    client = await etcd.connect(args.etcd)
    try:
        sessions = await Ledger(client).sessions()
    finally:
        await client.close()
    if args.tenant is not None:
        sessions = [u for u in sessions if (u.tenant or "-") == args.tenant]
    per_session = rows(sessions, since_ms)
    tenants = {t: round(s, 3) for t, s in sorted(by_tenant(sessions, since_ms).items())}
    if args.json:
        print(json.dumps({"since_unix_ms": since_ms, "sessions": per_session, "tenants": tenants}))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["kind", "tenant", "session_id", "model_id", "seconds", "frames"])
        for row in per_session:
            writer.writerow(
                [
                    "session",
                    row["tenant"],
                    row["session_id"],
                    row["model_id"],
                    row["seconds"],
                    row["frames"],
                ]
            )
        for tenant, seconds in tenants.items():
            writer.writerow(["tenant", tenant, "", "", seconds, ""])
    else:
        print(f"{'tenant':<16} {'session':<34} {'model':<18} {'seconds':>10} {'frames':>8}")
        for row in per_session:
            print(
                f"{row['tenant']:<16} {row['session_id']:<34} {row['model_id']:<18} "
                f"{row['seconds']:>10.3f} {row['frames']:>8}"
            )
        print()
        for tenant, seconds in tenants.items():
            print(f"{tenant:<16} {'(all sessions)':<34} {'':<18} {seconds:>10.3f}")
    return 0
