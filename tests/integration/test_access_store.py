"""API keys and signing keys in a real etcd: the store, ``AccessView``'s watch, and the
``windflow keys|token`` commands. Each test keeps to an etcd prefix of its own."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from etcd3aio import Etcd3Client, prefix_range_end

from windflow import cli
from windflow.access.keys import AccessStore, AccessView
from windflow.access.tokens import TokenVerifier
from windflow.common import etcd, names
from windflow.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from windflow.infra import EtcdServer


@pytest.fixture
def root() -> str:
    return f"/test/access/{uuid.uuid4().hex}/"


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[Etcd3Client]:
    client = await etcd.connect(etcd_server.endpoint)
    try:
        yield client
    finally:
        await client.close()


async def _stored_values(client: Etcd3Client, root: str) -> list[bytes]:
    reply = await etcd.kv(client).get(root.encode(), prefix_range_end(root.encode()))
    return [item.value for item in reply.kvs]


async def _eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {within} s")
        await asyncio.sleep(0.02)


async def test_create_list_revoke_and_no_secret_in_etcd(client: Etcd3Client, root: str) -> None:
    store = AccessStore(client, root)
    first, first_key = await store.create_key("acme", "ci")
    second, second_key = await store.create_key("acme")
    other, _ = await store.create_key("globex", "prod")
    assert first_key.startswith(f"wfk_{first.key_id}_") and len(first.key_id) == 12
    assert (first.tenant, first.name, first.revoked) == ("acme", "ci", False)

    assert [key.key_id for key in await store.list_keys()] == [
        first.key_id,
        second.key_id,
        other.key_id,
    ]
    assert [key.key_id for key in await store.list_keys("acme")] == [first.key_id, second.key_id]
    assert await store.list_keys("nobody") == []

    for whole in (first_key, second_key):
        secret = whole.removeprefix(f"wfk_{whole[4:16]}_")
        assert len(secret) == 43
        for value in await _stored_values(client, root):
            assert secret.encode() not in value and whole.encode() not in value

    revoked = await store.revoke_key(first.key_id)
    assert revoked.revoked and revoked.revoked_unix_ms >= first.created_unix_ms
    assert await store.revoke_key(first.key_id) == revoked  # idempotent
    listed = {key.key_id: key for key in await store.list_keys()}
    assert listed[first.key_id].revoked and not listed[second.key_id].revoked
    with pytest.raises(NotFound):
        await store.revoke_key("0123456789ab")
    with pytest.raises(NotFound):
        await store.revoke_key("../../etc")
    with pytest.raises(InvalidArgument, match="tenant"):
        await store.create_key("bad tenant")


async def test_authenticate(client: Etcd3Client, root: str) -> None:
    store = AccessStore(client, root)
    key, whole = await store.create_key("acme")
    assert await store.authenticate(whole) == key

    wrong = whole[:-4] + ("AAAA" if not whole.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated) as wrong_secret:
        await store.authenticate(wrong)
    unknown_id = "f" * 12 if key.key_id != "f" * 12 else "e" * 12
    with pytest.raises(Unauthenticated) as unknown:
        await store.authenticate(f"wfk_{unknown_id}_{whole[17:]}")
    assert wrong_secret.value.message.replace(key.key_id, "ID") == (
        unknown.value.message.replace(unknown_id, "ID")
    )
    for malformed in ("", "wfk_", "nope", whole + "x", whole.replace("wfk_", "wfx_")):
        with pytest.raises(Unauthenticated, match="malformed"):
            await store.authenticate(malformed)

    await store.revoke_key(key.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await store.authenticate(whole)
    with pytest.raises(Unauthenticated, match="revoked"):
        await store.mint(whole)


async def test_gateways_starting_together_make_one_signing_key(
    etcd_server: EtcdServer, root: str
) -> None:
    clients = [await etcd.connect(etcd_server.endpoint) for _ in range(4)]
    try:
        stores = [AccessStore(client, root) for client in clients]
        keys = await asyncio.gather(*(store.active_signing_key() for store in stores))
        assert len({key.kid for key in keys}) == 1
        assert [key.kid for key in await stores[0].signing_keys()] == [keys[0].kid]
        assert (await stores[1].active_signing_key()).kid == keys[0].kid
    finally:
        for client in clients:
            await client.close()


async def test_rotate_keeps_old_tokens_until_retired(client: Etcd3Client, root: str) -> None:
    store = AccessStore(client, root)
    _, whole = await store.create_key("acme")
    old_token, old_claims = await store.mint(whole, models=["wan"], budget_s=30, ttl_s=60)
    first = await store.active_signing_key()
    assert old_claims.kid == first.kid and old_claims.tenant == "acme"

    second = await store.rotate_signing_key()
    assert (await store.active_signing_key()).kid == second.kid
    new_token, new_claims = await store.mint(whole)
    assert new_claims.kid == second.kid

    verifier = TokenVerifier()
    verifier.update_keys(await store.signing_keys())
    assert verifier.verify(old_token) == old_claims
    assert verifier.verify(new_token) == new_claims

    retired = await store.retire_signing_key(first.kid)
    assert retired.retired and retired.private_key is None
    assert await store.retire_signing_key(first.kid) == retired  # idempotent
    stored = json.loads(
        (await etcd.kv(client).get(names.signing_key_key(first.kid, root))).kvs[0].value
    )
    assert stored["retired"] and "private" not in stored  # the private half is gone
    verifier.update_keys(await store.signing_keys())
    with pytest.raises(Unauthenticated, match="retired"):
        verifier.verify(old_token)
    assert verifier.verify(new_token) == new_claims

    with pytest.raises(FailedPrecondition, match="rotate first"):
        await store.retire_signing_key(second.kid)
    with pytest.raises(NotFound):
        await store.retire_signing_key("knope")


async def test_view_follows_revocations_and_rotations(client: Etcd3Client, root: str) -> None:
    store = AccessStore(client, root)
    view = AccessView(client, root)
    await view.start()
    try:
        assert view.verifier.kids == frozenset()
        key, whole = await store.create_key("acme")
        token, claims = await store.mint(whole)  # makes the first signing key
        await _eventually(lambda: claims.kid in view.verifier.kids)
        assert view.verifier.verify(token) == claims

        await store.revoke_key(key.key_id)
        await _eventually(lambda: key.key_id in view.verifier.revoked)
        with pytest.raises(Unauthenticated, match="revoked"):
            view.verifier.verify(token)

        _, other_whole = await store.create_key("acme")
        other_token, other_claims = await store.mint(other_whole)
        rotated = await store.rotate_signing_key()
        await _eventually(lambda: rotated.kid in view.verifier.kids)
        assert view.verifier.verify(other_token) == other_claims
        await store.retire_signing_key(claims.kid)
        await _eventually(lambda: _refuses(view.verifier, other_token))

        revision = await view.refresh()  # a reload agrees with what the watch built
        assert revision > 0 and view.verifier.kids == {claims.kid, rotated.kid}
        assert view.verifier.revoked == {key.key_id}
        with pytest.raises(Unauthenticated, match="retired"):
            view.verifier.verify(other_token)
    finally:
        await view.aclose()


def _refuses(verifier: TokenVerifier, token: str) -> bool:
    try:
        verifier.verify(token)
    except Unauthenticated:
        return True
    return False


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_keys_and_token(
    etcd_server: EtcdServer, root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--etcd", etcd_server.endpoint, "--access-root", root]
    code, out, err = _cli(capsys, "keys", "create", *where, "--tenant", "acme", "--name", "ci")
    assert code == 0 and "only time" in err
    created = json.loads(out)
    assert created["tenant"] == "acme" and created["key"].startswith(f"wfk_{created['key_id']}_")

    code, out, _ = _cli(capsys, "keys", "list", *where, "--json")
    assert code == 0 and [key["key_id"] for key in json.loads(out)] == [created["key_id"]]
    assert created["key"] not in out
    code, out, _ = _cli(capsys, "keys", "list", *where, "--tenant", "acme")
    assert code == 0 and created["key_id"] in out and "KEY_ID" in out

    mint = ["token", *where, "--key", created["key"], "--model", "wan", "--model", "sim"]
    code, out, _ = _cli(capsys, *mint, "--region", "eu", "--budget-s", "60", "--ttl-s", "120")
    assert code == 0
    bare_token = out.strip()
    code, out, _ = _cli(capsys, *mint, "--max-sessions", "2", "--json")
    assert code == 0
    minted = json.loads(out)
    assert minted["tenant"] == "acme" and minted["kid"].startswith("k")

    async def verify() -> None:
        client = await etcd.connect(etcd_server.endpoint)
        try:
            verifier = TokenVerifier()
            verifier.update_keys(await AccessStore(client, root).signing_keys())
        finally:
            await client.close()
        bare = verifier.verify(bare_token)
        assert (bare.models, bare.regions, bare.budget_s) == (("wan", "sim"), ("eu",), 60.0)
        assert bare.exp - bare.iat == 120
        claims = verifier.verify(minted["token"])
        assert claims.jti == minted["token_id"] and claims.max_sessions == 2
        assert claims.exp * 1000 == minted["expires_unix_ms"]

    asyncio.run(verify())

    code, out, _ = _cli(capsys, "keys", "signing", "list", *where, "--json")
    assert code == 0 and [key["kid"] for key in json.loads(out)] == [minted["kid"]]
    code, out, _ = _cli(capsys, "keys", "signing", "rotate", *where)
    assert code == 0 and json.loads(out)["active"]
    code, out, _ = _cli(capsys, "keys", "signing", "retire", *where, minted["kid"])
    assert code == 0 and json.loads(out)["retired"]
    code, out, _ = _cli(capsys, "keys", "signing", "list", *where)
    assert code == 0 and "retired" in out and "active" in out

    code, out, _ = _cli(capsys, "keys", "revoke", *where, created["key_id"])
    assert code == 0 and json.loads(out)["revoked"]
    code, out, err = _cli(capsys, "token", *where, "--key", created["key"])
    assert code == 1 and out == "" and err.startswith("windflow: UNAUTHENTICATED: ")
    assert created["key"] not in err
    code, _, err = _cli(capsys, "keys", "revoke", *where, "0123456789ab")
    assert code == 1 and err.startswith("windflow: NOT_FOUND: ")


async def test_view_reloads_after_its_watch_breaks(
    client: Etcd3Client,
    root: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = AccessStore(client, root)
    key, whole = await store.create_key("acme")
    token, claims = await store.mint(whole)
    view = AccessView(client, root)
    follow = view._follow
    breaks = 0

    async def breaking(revision: int) -> None:
        nonlocal breaks
        if breaks == 0:
            breaks += 1
            await store.revoke_key(key.key_id)  # lands while no watch runs
            raise RuntimeError("watch stream broke")
        await follow(revision)

    monkeypatch.setattr(view, "_follow", breaking)
    monkeypatch.setattr("windflow.access.keys.WATCH_BACKOFF_S", (0.05, 0.1))
    await view.start()
    try:
        assert view.verifier.verify(token) == claims
        await _eventually(lambda: key.key_id in view.verifier.revoked)  # the reload saw it
        assert "access watch broke" in caplog.text
        rotated = await store.rotate_signing_key()  # and the new watch follows on
        await _eventually(lambda: rotated.kid in view.verifier.kids)
    finally:
        await view.aclose()


async def test_view_counts_a_corrupt_api_key_record_as_revoked(
    client: Etcd3Client, root: str
) -> None:
    await etcd.kv(client).put(names.api_key_key("0123456789ab", root), b"{not json")
    view = AccessView(client, root)
    await view.refresh()
    assert view.verifier.revoked == {"0123456789ab"}
