"""Local development access: the key and token ``windflow up`` makes for its stack.

A tenant ``dev`` gets one API key, kept (with the token it mints) in the stack's state dir,
readable by its owner only: ``<state dir>/api-key`` and ``<state dir>/token``. A stack
started again on the same state dir reuses the key (its etcd keeps the record) and mints a
new token. ``windflow play``, the SDK and the benches read the token (WINDFLOW_TOKEN).
"""

from __future__ import annotations

import os
from pathlib import Path

from windflow.access.keys import AccessStore
from windflow.common import etcd
from windflow.errors import Unauthenticated

DEV_TENANT = "dev"
DEV_TOKEN_TTL_S = 7 * 24 * 3600.0


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


async def dev_token(etcd_endpoint: str, state_dir: Path) -> str:
    """The development tenant's token for the stack whose etcd is ``etcd_endpoint`` (its
    key made, or reused from ``state_dir``); written to ``state_dir/token``."""
    client = await etcd.connect(etcd_endpoint)
    try:
        store = AccessStore(client)
        key_file = state_dir / "api-key"
        api_key = key_file.read_text().strip() if key_file.exists() else ""
        try:
            if not api_key:
                raise Unauthenticated("no key yet")
            token, _ = await store.mint(api_key, ttl_s=DEV_TOKEN_TTL_S)
        except Unauthenticated:
            _, api_key = await store.create_key(DEV_TENANT, name="windflow up")
            _write_private(key_file, api_key)
            token, _ = await store.mint(api_key, ttl_s=DEV_TOKEN_TTL_S)
    finally:
        await client.close()
    _write_private(state_dir / "token", token)
    return token
