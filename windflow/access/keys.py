"""API keys and token signing keys in etcd, and a verifier kept current from there.

An API key is ``wfk_<key_id>_<secret>``: the key id (12 hex) names its record, the secret
(32 random bytes, base64url) is shown once when it is created. etcd holds only a SHA-256 of
the whole key, so a copy of etcd cannot mint tokens with it (the secret's 256 bits make a
salt needless). Signing keys are kept whole (their private half too: every gateway signs
with the active one) until retired, when the private half is dropped.

Every gateway runs an ``AccessView``: it loads the signing keys and revoked API keys, then
follows the access prefix with an etcd watch, so a revocation or rotation reaches every
verifier within moments.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.kv import Compare

from windflow.access import tokens
from windflow.access.tokens import Claims, SigningKey, TokenVerifier
from windflow.common import etcd, names
from windflow.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)

log = logging.getLogger(__name__)

API_KEY_PREFIX = "wfk_"
API_KEY_RE = re.compile(r"wfk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
MAX_NAME_CHARS = 128
WATCH_BACKOFF_S = (0.2, 5.0)
"""First and longest wait before an ``AccessView`` reloads after its watch broke."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A tenant's API key as stored: never its secret, nor the secret's hash."""

    key_id: str
    tenant: str
    name: str
    created_unix_ms: int
    revoked: bool = False
    revoked_unix_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key_record(key: ApiKey, sha256: str) -> bytes:
    return json.dumps({**key.as_dict(), "sha256": sha256}, sort_keys=True).encode()


def _parse_key_record(data: bytes) -> tuple[ApiKey, str]:
    """The key and the SHA-256 its secret must hash to."""
    try:
        record = json.loads(data)
        key = ApiKey(
            key_id=record["key_id"],
            tenant=record["tenant"],
            name=record["name"],
            created_unix_ms=record["created_unix_ms"],
            revoked=record["revoked"],
            revoked_unix_ms=record["revoked_unix_ms"],
        )
        sha256 = record["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataLoss(f"API key record is corrupt: {type(exc).__name__}") from exc
    if not isinstance(sha256, str) or not isinstance(key.revoked, bool):
        raise DataLoss(f"API key record {key.key_id} is corrupt")
    return key, sha256


def _unchanged_since(prefix: str, revision: int) -> Compare:
    """A transaction compare that holds while no key under ``prefix`` was written after
    ``revision`` (the keys are never deleted, so a write is all that can change them)."""
    return Compare(
        result=Compare.LESS,
        target=Compare.MOD,
        key=prefix.encode(),
        range_end=prefix_range_end(prefix.encode()),
        mod_revision=revision + 1,
    )


class AccessStore:
    """API keys and signing keys in etcd. ``root``: the etcd prefix (tests use their own)."""

    def __init__(self, client: Etcd3Client, root: str = names.ACCESS_PREFIX) -> None:
        self._client = client
        self._root = root

    # ---- API keys ----

    async def create_key(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """A new API key for ``tenant``; the string is the whole key, never stored: show
        it to its owner once."""
        tokens.check_tenant(tenant)
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise InvalidArgument(f"key name must be printable, at most {MAX_NAME_CHARS} chars")
        kv = etcd.kv(self._client)
        for _ in range(3):  # a key id collision is all but impossible: retry it anyway
            key_id = secrets.token_hex(6)
            secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
            whole = f"{API_KEY_PREFIX}{key_id}_{secret}"
            key = ApiKey(key_id=key_id, tenant=tenant, name=name, created_unix_ms=_now_ms())
            path = names.api_key_key(key_id, self._root)
            reply = await kv.txn(
                compare=[kv.txn_compare_create_revision(path, 0)],
                success=[kv.txn_op_put(path, _key_record(key, _digest(whole)))],
            )
            if reply.succeeded:
                log.info("created API key %s for tenant %s", key_id, tenant)
                return key, whole
        raise Internal("could not pick an unused API key id")

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """The API keys (of ``tenant``, or all), oldest first (by etcd create revision)."""
        prefix = names.api_keys_prefix(self._root).encode()
        reply = await etcd.kv(self._client).get(prefix, prefix_range_end(prefix))
        items = sorted(reply.kvs, key=lambda item: item.create_revision)
        keys = [_parse_key_record(item.value)[0] for item in items]
        return [key for key in keys if tenant is None or key.tenant == tenant]

    async def _read_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        reply = await etcd.kv(self._client).get(names.api_key_key(key_id, self._root))
        return _parse_key_record(reply.kvs[0].value) if reply.kvs else None

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke an API key: it mints no more tokens, and those it minted stop verifying
        (every ``AccessView`` sees it). Revoking a revoked key changes nothing."""
        found = await self._read_key(key_id) if KEY_ID_RE.fullmatch(key_id) else None
        if found is None:
            raise NotFound(f"no API key {key_id!r}")
        key, sha256 = found
        if key.revoked:
            return key
        key = dataclasses.replace(key, revoked=True, revoked_unix_ms=_now_ms())
        path = names.api_key_key(key_id, self._root)
        await etcd.kv(self._client).put(path, _key_record(key, sha256))
        log.info("revoked API key %s of tenant %s", key_id, key.tenant)
        return key

    async def authenticate(self, api_key: str) -> ApiKey:
        """The stored key that ``api_key`` is; Unauthenticated if it is not a live one."""
        match = API_KEY_RE.fullmatch(api_key)
        if match is None:
            raise Unauthenticated("malformed API key: expected wfk_<key id>_<secret>")
        key_id = match.group(1)
        found = await self._read_key(key_id)
        # one message for an unknown key and a wrong secret: they tell a guesser nothing
        if found is None or not hmac.compare_digest(_digest(api_key), found[1]):
            raise Unauthenticated(f"API key {key_id} is unknown or its secret is wrong")
        key = found[0]
        if key.revoked:
            raise Unauthenticated(f"API key {key_id} is revoked")
        return key

    # ---- signing keys ----

    async def _signing_snapshot(self) -> tuple[list[SigningKey], int]:
        """The signing keys, oldest first by etcd create revision (a clock-free order),
        and the revision read at."""
        prefix = names.signing_keys_prefix(self._root).encode()
        reply = await etcd.kv(self._client).get(prefix, prefix_range_end(prefix))
        items = sorted(reply.kvs, key=lambda item: item.create_revision)
        return [SigningKey.from_record(item.value) for item in items], reply.header.revision

    async def signing_keys(self) -> list[SigningKey]:
        """Every signing key, retired ones too, oldest first."""
        return (await self._signing_snapshot())[0]

    async def active_signing_key(self) -> SigningKey:
        """The newest signing key not retired: the one tokens are signed with. Where there
        is none (a new mesh) one is made, in a transaction that holds only while the
        signing keys are as read: gateways starting together make only one."""
        kv = etcd.kv(self._client)
        prefix = names.signing_keys_prefix(self._root)
        while True:
            keys, revision = await self._signing_snapshot()
            active = [key for key in keys if not key.retired]
            if active:
                return active[-1]
            key = SigningKey.generate()
            path = names.signing_key_key(key.kid, self._root)
            reply = await kv.txn(
                compare=[_unchanged_since(prefix, revision)],
                success=[kv.txn_op_put(path, key.to_record())],
            )
            if reply.succeeded:
                log.info("created the first signing key %s", key.kid)
                return key

    async def rotate_signing_key(self) -> SigningKey:
        """A new active signing key. The old ones keep verifying the tokens they signed
        until retired (retire them once those tokens have expired: at most 30 days)."""
        kv = etcd.kv(self._client)
        for _ in range(3):
            key = SigningKey.generate()
            path = names.signing_key_key(key.kid, self._root)
            reply = await kv.txn(
                compare=[kv.txn_compare_create_revision(path, 0)],
                success=[kv.txn_op_put(path, key.to_record())],
            )
            if reply.succeeded:
                log.info("rotated to signing key %s", key.kid)
                return key
        raise Internal("could not pick an unused signing key id")

    async def retire_signing_key(self, kid: str) -> SigningKey:
        """Retire a signing key: the tokens it signed stop verifying, and its private half
        is deleted. The last key not retired cannot go (rotate first)."""
        kv = etcd.kv(self._client)
        prefix = names.signing_keys_prefix(self._root)
        while True:
            keys, revision = await self._signing_snapshot()
            key = next((key for key in keys if key.kid == kid), None)
            if key is None:
                raise NotFound(f"no signing key {kid!r}")
            if key.retired:
                return key
            if not any(not other.retired and other.kid != kid for other in keys):
                raise FailedPrecondition(
                    f"signing key {kid} is the only one not retired: rotate first"
                )
            retired = dataclasses.replace(key, private_key=None, retired=True)
            # as read, or two retirements at once could leave no key to sign with
            reply = await kv.txn(
                compare=[_unchanged_since(prefix, revision)],
                success=[
                    kv.txn_op_put(
                        names.signing_key_key(kid, self._root),
                        retired.to_record(include_private=False),
                    )
                ],
            )
            if reply.succeeded:
                log.info("retired signing key %s", kid)
                return retired

    async def mint(
        self,
        api_key: str,
        *,
        models: Sequence[str] = (),
        regions: Sequence[str] = (),
        max_sessions: int = 0,
        budget_s: float = 0.0,
        ttl_s: float = 3600.0,
    ) -> tuple[str, Claims]:
        """A token for the tenant of ``api_key``, signed with the active key."""
        key = await self.authenticate(api_key)
        signing = await self.active_signing_key()
        return tokens.mint(
            signing,
            tenant=key.tenant,
            key_id=key.key_id,
            models=models,
            regions=regions,
            max_sessions=max_sessions,
            budget_s=budget_s,
            ttl_s=ttl_s,
        )


class AccessView:
    """A ``TokenVerifier`` (``verifier``) kept current from etcd: ``await start()`` loads
    the signing keys and revoked API keys, then a watch on the access prefix applies each
    change. Should the watch break, it reloads everything (after a short backoff) and
    watches again. ``await aclose()`` stops it.

    Windflow never deletes key records: revoke an API key, retire a signing key. A record
    deleted by hand anyway counts, seen by the watch, as revoked (a signing key: unknown);
    after a reload a deleted API key's unexpired tokens would verify again.
    """

    def __init__(self, client: Etcd3Client, root: str = names.ACCESS_PREFIX) -> None:
        self._client = client
        self._root = root
        self.verifier = TokenVerifier()
        self._signing: dict[str, SigningKey] = {}
        self._revoked: set[str] = set()
        self._revision = 0
        """The etcd revision the state reflects: older watch events are skipped."""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        revision = await self.refresh()
        self._task = asyncio.create_task(self._watch_loop(revision), name="access-view")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> int:
        """Reload everything (one read: one consistent revision); returns that revision."""
        prefix = self._root.encode()
        reply = await etcd.kv(self._client).get(prefix, prefix_range_end(prefix))
        revision = int(reply.header.revision)
        if revision < self._revision:
            return self._revision  # the watch got further meanwhile
        self._signing.clear()
        self._revoked.clear()
        for item in reply.kvs:
            self._apply(item.key.decode(), item.value)
        self._revision = revision
        self._publish()
        return revision

    def _publish(self, signing: bool = True) -> None:
        """Hand the state to the verifier; the signing keys only when they changed (that
        clears its cache)."""
        if signing:
            self.verifier.update_keys(self._signing.values())
        self.verifier.update_revoked(self._revoked)

    def _apply(self, path: str, value: bytes | None) -> bool:
        """One key's new value (None: deleted); True if it was a signing key's. A corrupt
        record is logged; an API key's then counts as revoked (failing closed)."""
        keys_prefix = names.api_keys_prefix(self._root)
        signing_prefix = names.signing_keys_prefix(self._root)
        if path.startswith(keys_prefix):
            key_id = path.removeprefix(keys_prefix)
            try:
                revoked = value is None or _parse_key_record(value)[0].revoked
            except DataLoss as exc:
                log.warning("API key record %s is corrupt (%s): revoking it", path, exc.message)
                revoked = True
            if revoked:
                self._revoked.add(key_id)
            else:
                self._revoked.discard(key_id)
        elif path.startswith(signing_prefix):
            kid = path.removeprefix(signing_prefix)
            try:
                if value is None:
                    self._signing.pop(kid, None)
                else:
                    self._signing[kid] = SigningKey.from_record(value).public_only()
            except DataLoss as exc:
                log.warning("skipping signing key record %s: %s", path, exc.message)
                self._signing.pop(kid, None)
            return True
        return False

    async def _watch_loop(self, revision: int) -> None:
        backoff = WATCH_BACKOFF_S[0]
        while True:
            try:
                await self._follow(revision)
                log.warning("access watch ended; reloading in %.1f s", backoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("access watch broke; reloading in %.1f s", backoff, exc_info=True)
            await asyncio.sleep(backoff)
            try:
                revision = await self.refresh()
                backoff = WATCH_BACKOFF_S[0]
            except Exception:
                log.warning("access reload failed", exc_info=True)
                backoff = min(backoff * 2, WATCH_BACKOFF_S[1])

    async def _follow(self, revision: int) -> None:
        """Apply the changes after ``revision`` until the watch ends: cancelled by etcd
        (e.g. the revision was compacted away) or the stream closed."""
        assert self._client.watch is not None
        prefix = self._root.encode()
        async for response in self._client.watch.watch(
            prefix, prefix_range_end(prefix), start_revision=revision + 1
        ):
            if response.canceled or response.compact_revision:
                return
            changed, signing = False, False
            for event in response.events:
                if event.kv.mod_revision <= self._revision:
                    continue  # a refresh already read it
                deleted = event.type == event.DELETE
                value = None if deleted else event.kv.value
                signing |= self._apply(event.kv.key.decode(), value)
                self._revision = event.kv.mod_revision
                changed = True
            if changed:
                self._publish(signing)
