"""``windflow keys|token``: tenants' API keys, token signing keys, and minting a token.

Both talk to etcd directly (``--etcd``, or WINDFLOW_ETCD), as an operator would: there is
no gateway in the way. ``keys create`` prints the new key once (etcd keeps only its hash);
``token`` mints a session token locally with an API key, as the Access service would.
Exit status: 0 done, 1 refused (``windflow: CODE: message`` on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from etcd3aio import EtcdError

from windflow.access.keys import AccessStore, ApiKey
from windflow.access.tokens import SigningKey
from windflow.common import env, etcd, names
from windflow.errors import WindflowError

Action = Callable[[AccessStore, argparse.Namespace], Awaitable[int]]


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="tenants' API keys and token signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = _with_etcd(actions.add_parser("create", help="a new API key (shown once)"))
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="", help="a label for the key")
    create.set_defaults(func=_runner(_create))

    listing = _with_etcd(actions.add_parser("list", help="API keys (never their secrets)"))
    listing.add_argument("--tenant", default=None, help="only this tenant's")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.set_defaults(func=_runner(_list))

    revoke = _with_etcd(actions.add_parser("revoke", help="revoke an API key and its tokens"))
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_runner(_revoke))

    signing = actions.add_parser("signing", help="token signing keys")
    signing_actions = signing.add_subparsers(dest="signing_command", required=True)
    signing_list = _with_etcd(signing_actions.add_parser("list", help="every signing key"))
    signing_list.add_argument("--json", action="store_true", help="one JSON array")
    signing_list.set_defaults(func=_runner(_signing_list))
    rotate = _with_etcd(signing_actions.add_parser("rotate", help="sign with a new key"))
    rotate.set_defaults(func=_runner(_rotate))
    retire = _with_etcd(
        signing_actions.add_parser("retire", help="stop a key verifying the tokens it signed")
    )
    retire.add_argument("kid")
    retire.set_defaults(func=_runner(_retire))

    token = _with_etcd(sub.add_parser("token", help="mint a session token with an API key"))
    token.add_argument("--key", required=True, help="the API key wfk_... ('-': read stdin)")
    token.add_argument("--model", action="append", default=[], help="allow this model (repeat)")
    token.add_argument("--region", action="append", default=[], help="allow this region")
    token.add_argument("--max-sessions", type=int, default=0, help="live sessions (0: no cap)")
    token.add_argument("--budget-s", type=float, default=0.0, help="stream seconds (0: no cap)")
    token.add_argument("--ttl-s", type=float, default=3600.0, help="lifetime (default 3600)")
    token.add_argument("--json", action="store_true", help="a JSON object, not just the token")
    token.set_defaults(func=_runner(_token))


def _with_etcd(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    default = env.ETCD_ENDPOINT.get()
    parser.add_argument("--etcd", default=default, required=default is None, help="etcd host:port")
    # tests sharing one etcd keep to a prefix of their own
    parser.add_argument("--access-root", default=names.ACCESS_PREFIX, help=argparse.SUPPRESS)
    return parser


def _runner(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = asyncio.run(_connected(action, args))
        except WindflowError as exc:
            print(f"windflow: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except EtcdError as exc:
            print(f"windflow: UNAVAILABLE: etcd at {args.etcd}: {exc}", file=sys.stderr)
            return 1
        return code

    return run


async def _connected(action: Action, args: argparse.Namespace) -> int:
    client = await etcd.connect(args.etcd)
    try:
        return await action(AccessStore(client, args.access_root), args)
    finally:
        await client.close()


def _when(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_ms / 1000))


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


async def _create(store: AccessStore, args: argparse.Namespace) -> int:
    key, whole = await store.create_key(args.tenant, args.name)
    print(json.dumps({"key_id": key.key_id, "tenant": key.tenant, "name": key.name, "key": whole}))
    print(
        "windflow: this is the only time the key is shown (etcd keeps just its hash): store it now",
        file=sys.stderr,
    )
    return 0


async def _list(store: AccessStore, args: argparse.Namespace) -> int:
    keys = await store.list_keys(args.tenant)
    if args.json:
        print(json.dumps([key.as_dict() for key in keys]))
        return 0
    rows = [["KEY_ID", "TENANT", "NAME", "CREATED", "REVOKED"]]
    rows += [[k.key_id, k.tenant, k.name, _when(k.created_unix_ms), _revoked(k)] for k in keys]
    _print_table(rows)
    return 0


def _revoked(key: ApiKey) -> str:
    return _when(key.revoked_unix_ms) if key.revoked else "-"


async def _revoke(store: AccessStore, args: argparse.Namespace) -> int:
    print(json.dumps((await store.revoke_key(args.key_id)).as_dict()))
    return 0


def _signing_dict(key: SigningKey, active: bool) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "created_unix_ms": key.created_unix_ms,
        "retired": key.retired,
        "active": active,
    }


async def _signing_list(store: AccessStore, args: argparse.Namespace) -> int:
    keys = await store.signing_keys()
    live = [key.kid for key in keys if not key.retired]
    active = live[-1] if live else ""
    entries = [_signing_dict(key, key.kid == active) for key in keys]
    if args.json:
        print(json.dumps(entries))
        return 0
    rows = [["KID", "CREATED", "STATE"]]
    for entry in entries:
        state = "active" if entry["active"] else "retired" if entry["retired"] else "verifying"
        rows.append([entry["kid"], _when(entry["created_unix_ms"]), state])
    _print_table(rows)
    return 0


async def _rotate(store: AccessStore, args: argparse.Namespace) -> int:
    print(json.dumps(_signing_dict(await store.rotate_signing_key(), active=True)))
    return 0


async def _retire(store: AccessStore, args: argparse.Namespace) -> int:
    print(json.dumps(_signing_dict(await store.retire_signing_key(args.kid), active=False)))
    return 0


async def _token(store: AccessStore, args: argparse.Namespace) -> int:
    api_key = sys.stdin.readline().strip() if args.key == "-" else args.key
    token, claims = await store.mint(
        api_key,
        models=args.model,
        regions=args.region,
        max_sessions=args.max_sessions,
        budget_s=args.budget_s,
        ttl_s=args.ttl_s,
    )
    if not args.json:
        print(token)
        return 0
    reply = {
        "token": token,
        "token_id": claims.jti,
        "tenant": claims.tenant,
        "expires_unix_ms": claims.exp * 1000,
        "kid": claims.kid,
    }
    print(json.dumps(reply))
    return 0
