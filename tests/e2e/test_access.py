"""Access end to end (docs/access.md): tokens checked on every public call, tenancy,
budgets, quotas and per-second metering. Real etcd, NATS and services; the gateway runs
without --insecure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import pytest_asyncio
from etcd3aio import Etcd3Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import cli, errors
from windflow.access import tokens
from windflow.access.keys import AccessStore
from windflow.access.usage import Ledger
from windflow.common import grpc_util
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

CREATES_PER_S = 3.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(
        tmp_path_factory.mktemp("access"),
        workers=2,
        secure=True,
        gateway_args=("--tenant-creates-per-s", str(CREATES_PER_S)),
        worker_args=("--checkpoint-every", "24"),
    ) as m:
        yield m


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def etcd_client(mesh: Mesh) -> AsyncIterator[Etcd3Client]:
    client = Etcd3Client([mesh.etcd.endpoint])
    await client.connect()
    yield client
    await client.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def store(etcd_client: Etcd3Client) -> AccessStore:
    return AccessStore(etcd_client)


async def billed(ledger: Ledger, token_id: str, at_least: float, within_s: float = 15.0) -> float:
    """The token's billed seconds once the ledger has at least ``at_least`` of them (its
    records land within about a second of the frames)."""
    deadline = time.monotonic() + within_s
    while (seconds := await ledger.token_seconds(token_id)) < at_least - 1e-6:
        if time.monotonic() > deadline:
            sessions = [(u.session_id, u.frames, u.tokens) for u in await ledger.sessions()]
            raise AssertionError(f"{seconds} s billed, not {at_least}; the ledger: {sessions}")
        await asyncio.sleep(0.2)
    return seconds


async def token_for(store: AccessStore, tenant: str, **scope: object) -> str:
    _, api_key = await store.create_key(tenant)
    token, _ = await store.mint(api_key, **scope)  # type: ignore[arg-type]
    return token


async def new_session(client: Client, seed: int = 1) -> pb.Session:
    return await client.create_session(
        DEFAULT_MODEL, seed=seed, format="rgb", output_policy="pause", quality="fixed"
    )


async def error_of(call: Awaitable[object]) -> str:
    """The status ``call`` ended with ("OK" if none)."""
    try:
        await call
    except errors.WindflowError as err:
        return err.code
    return "OK"


async def until_refused(mesh: Mesh, token: str, within_s: float = 10.0) -> None:
    """Wait until the gateway refuses ``token`` (a revocation or a retirement travels to
    it through an etcd watch)."""
    deadline = time.monotonic() + within_s
    async with Client(mesh.gateway, token=token) as client:
        while True:
            try:
                await client.list_models()
            except errors.Unauthenticated:
                return
            assert time.monotonic() < deadline, "the gateway still accepts the token"
            await asyncio.sleep(0.1)


async def refused_stream(
    client: Client,
    session: pb.Session,
    error: type[errors.WindflowError],
    resume_from: int | None = None,
) -> None:
    """The stream of ``session`` ends with ``error`` (from its Attach's write, when the
    gateway refuses it before that lands, or from its first read)."""
    live = None
    with pytest.raises(error):
        live = await client.attach(session, resume_from=resume_from)
        async for _ in live.frames(limit=1):
            pass
    if live is not None:
        await live.aclose()


def forge(token: str, **changes: object) -> str:
    """``token`` with claims changed and its signature kept (tampered)."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


async def test_bad_tokens_are_unauthenticated_and_health_stays_open(
    mesh: Mesh, store: AccessStore
) -> None:
    signing = await store.active_signing_key()
    good_key, api_key = await store.create_key("acme")
    good, _ = await store.mint(api_key)
    stranger = tokens.SigningKey.generate()
    forged, _ = tokens.mint(
        tokens.SigningKey(signing.kid, stranger.private_key, stranger.public_key, 0),
        tenant="acme",
        key_id=good_key.key_id,
    )
    now = time.time()
    expired, _ = tokens.mint(signing, tenant="acme", key_id=good_key.key_id, now=now - 7200)
    early, _ = tokens.mint(signing, tenant="acme", key_id=good_key.key_id, now=now + 600)
    revoked_key, revoked_api_key = await store.create_key("acme")
    revoked, _ = await store.mint(revoked_api_key)
    await store.revoke_key(revoked_key.key_id)
    bad = {
        "missing": "",
        "malformed": "not-a-token",
        "forged": forged,
        "tampered": forge(good, budget_s=0, tenant="other"),
        "expired": expired,
        "not yet valid": early,
        "revoked": revoked,
    }
    await until_refused(mesh, revoked)  # the gateway's view sees it through its watch
    answers: dict[str, list[str]] = {}
    for name, token in bad.items():
        async with Client(mesh.gateway, token=token) as client:
            answers[name] = [
                await error_of(client.list_models()),
                await error_of(new_session(client)),
                await error_of(client.get_session("0" * 32)),
            ]
            await refused_stream(client, pb.Session(session_id="0" * 32), errors.Unauthenticated)
    assert answers == {name: ["UNAUTHENTICATED"] * 3 for name in bad}
    # a retired signing key's tokens stop working; a new one signs meanwhile
    await store.rotate_signing_key()
    await store.retire_signing_key(signing.kid)
    await until_refused(mesh, good)
    async with Client(mesh.gateway, token=good) as client:
        with pytest.raises(errors.Unauthenticated, match="retired"):
            await client.list_models()
    async with Client(mesh.gateway, token=await token_for(store, "acme")) as client:
        assert [m.model_id for m in await client.list_models()] == [DEFAULT_MODEL]
    async with grpc_util.channel(mesh.gateway) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    log = mesh.log("gateway")
    for reason in ("expired", "not yet valid", "revoked key", "bad signature", "malformed"):
        assert f"refused ({reason}," in log


async def test_tokens_minted_by_the_access_service(mesh: Mesh, store: AccessStore) -> None:
    _, api_key = await store.create_key("minty")
    async with grpc_util.channel(mesh.gateway) as channel:
        stub = windflow_pb2_grpc.AccessStub(channel)
        minted = await stub.CreateToken(
            pb.CreateTokenRequest(models=[DEFAULT_MODEL], budget_s=5, ttl_s=60),
            metadata=(("authorization", f"Bearer {api_key}"),),
        )
        assert minted.tenant == "minty" and minted.token_id and minted.kid
        assert minted.expires_unix_ms > time.time() * 1000
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateToken(
                pb.CreateTokenRequest(), metadata=(("authorization", "Bearer wfk_bad_key"),)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with Client(mesh.gateway, token=minted.token) as client:
        session = await new_session(client)
        assert session.tenant == "minty"
        await client.close_session(session.session_id)


async def test_scope_is_permission_denied(mesh: Mesh, store: AccessStore) -> None:
    other_model = await token_for(store, "scoped", models=["some-other-model"])
    async with Client(mesh.gateway, token=other_model) as client:
        assert await client.list_models() == []  # it sees only what it may use
        with pytest.raises(errors.PermissionDenied, match="model"):
            await new_session(client)
    elsewhere = await token_for(store, "scoped", regions=["mars"])
    async with Client(mesh.gateway, token=elsewhere) as client:
        with pytest.raises(errors.PermissionDenied, match="region"):
            await client.create_session(DEFAULT_MODEL, region="earth")
    capped = await token_for(store, "capped", max_sessions=1)
    async with Client(mesh.gateway, token=capped) as client:
        first = await new_session(client)
        with pytest.raises(errors.PermissionDenied, match="allows 1 live sessions"):
            await new_session(client)
        with pytest.raises(errors.PermissionDenied):
            await client.fork(first.session_id, 0)
        await client.close_session(first.session_id)
        second = await new_session(client)  # closed ones do not count
        await client.close_session(second.session_id)


async def test_another_tenants_session_does_not_exist(mesh: Mesh, store: AccessStore) -> None:
    owner = await token_for(store, "owner")
    intruder = await token_for(store, "intruder")
    async with Client(mesh.gateway, token=owner) as mine:
        session = await new_session(mine, seed=3)
        live = await mine.attach(session)
        made = [f.frame async for f in live.frames(limit=10)]
        await live.aclose()
        child = await mine.fork(session.session_id, 5)
        assert child.tenant == "owner"  # forks inherit the tenant
    async with Client(mesh.gateway, token=intruder) as theirs:
        unknown = "f" * 32
        with pytest.raises(errors.NotFound) as missing:
            await theirs.get_session(unknown)
        for target in (session.session_id, child.session_id):
            with pytest.raises(errors.NotFound) as hidden:
                await theirs.get_session(target)
            assert str(hidden.value).replace(target, unknown) == str(missing.value)
            for call in (
                theirs.close_session(target),
                theirs.fork(target, 1),
                theirs.rewind(target, 1),
            ):
                with pytest.raises(errors.NotFound):
                    await call
            with pytest.raises(errors.NotFound):
                async for _ in theirs.replay(target, 0, 2):
                    pass
            await refused_stream(theirs, pb.Session(session_id=target), errors.NotFound)
    async with Client(mesh.gateway, token=owner) as mine:
        # nothing changed: the owner's session goes on where it was
        got = await mine.get_session(session.session_id)
        assert got.state != pb.SESSION_STATE_CLOSED and got.head_frame >= 10
        replayed = [r.frame.data async for r in mine.replay(session.session_id, 0, 10)]
        assert replayed == [f.data for f in made]
        for target in (session.session_id, child.session_id):
            await mine.close_session(target)


async def test_budget_stops_at_a_frame_and_a_new_token_resumes_bit_exactly(
    mesh: Mesh, store: AccessStore, etcd_client: Etcd3Client
) -> None:
    reference_token = await token_for(store, "budget")
    async with Client(mesh.gateway, token=reference_token) as client:
        reference = await new_session(client, seed=9)
        fps = reference.spec.fps
        live = await client.attach(reference)
        expected = [f.frame.data async for f in live.frames(limit=int(3 * fps))]
        await live.aclose()
        await client.close_session(reference.session_id)
        session = await new_session(client, seed=9)
    budget_s = 2.0
    _, api_key = await store.create_key("budget")
    limited, claims = await store.mint(api_key, budget_s=budget_s)
    async with Client(mesh.gateway, token=limited) as client:
        live = await client.attach(session)
        got: list[pb.Frame] = []
        with pytest.raises(errors.ResourceExhausted, match="budget"):
            async for received in live.frames():
                got.append(received.frame)
        events = list(live.events)
        await live.aclose()
    stop = int(budget_s * fps)
    assert [f.frame_index for f in got] == list(range(stop))
    assert [f.data for f in got] == expected[:stop]
    warned = [e.message for e in events if e.kind == pb.SessionEvent.KIND_BUDGET_WARNING]
    assert len(warned) == 2 and "80%" in warned[0] and "95%" in warned[1]
    (exhausted,) = [e for e in events if e.kind == pb.SessionEvent.KIND_BUDGET_EXHAUSTED]
    assert exhausted.frame_index == stop
    # the ledger bills exactly the budget; the spent token cannot attach again; a new one
    # resumes with nothing lost
    assert await billed(Ledger(etcd_client), claims.jti, budget_s) == pytest.approx(budget_s)
    async with Client(mesh.gateway, token=limited) as client:
        await refused_stream(client, session, errors.ResourceExhausted, resume_from=stop)
    fresh = await token_for(store, "budget")
    async with Client(mesh.gateway, token=fresh) as client:
        live = await client.attach(session, resume_from=stop)
        rest = [f.frame async for f in live.frames(limit=len(expected) - stop)]
        await live.aclose()
        assert [f.frame_index for f in rest] == list(range(stop, len(expected)))
        assert [f.data for f in rest] == expected[stop:]
        await client.close_session(session.session_id)


async def test_creation_quota_answers_resource_exhausted_with_retry_after(
    mesh: Mesh, store: AccessStore
) -> None:
    token = await token_for(store, "hasty")
    async with Client(mesh.gateway, token=token) as client:
        made = []
        with pytest.raises(errors.ResourceExhausted, match="faster than") as refused:
            for seed in range(int(4 * CREATES_PER_S)):
                made.append(await new_session(client, seed=seed))
        assert len(made) >= int(2 * CREATES_PER_S) - 1
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
        await asyncio.sleep(refused.value.retry_after_s)
        made.append(await new_session(client, seed=99))
        for session in made:
            await client.close_session(session.session_id)


async def test_usage_is_billed_once_across_a_worker_kill(
    mesh: Mesh, store: AccessStore, etcd_client: Etcd3Client
) -> None:
    _, api_key = await store.create_key("metered")
    token, claims = await store.mint(api_key)
    async with Client(mesh.gateway, token=token) as client:
        session = await new_session(client, seed=4)
        fps = session.spec.fps
        live = await client.attach(session)
        seen: list[int] = []
        async for received in live.frames(limit=int(4 * fps)):
            seen.append(received.index)
            if len(seen) == int(1.5 * fps):
                where = (await client.get_session(session.session_id)).worker_id
                mesh.kill(where)
        await live.aclose()
        assert seen == list(range(len(seen)))
        assert any(e.kind == pb.SessionEvent.KIND_RECOVERED for e in live.events)
        await client.close_session(session.session_id)
        await mesh.start_service(where)
    ledger = Ledger(etcd_client)
    # Every frame the client got is billed once, within a second: the frames the dead
    # worker sent and the new one sends again overlap (a frame counts once); what the
    # dead worker sent of its last second never reached the ledger.
    await billed(ledger, claims.jti, (len(seen) - fps) / fps)
    await asyncio.sleep(1.5)  # nothing more comes
    usage = await ledger.session(session.session_id)
    assert usage is not None
    assert abs(usage.seconds - len(seen) / fps) <= 1.0, (usage.frames, len(seen))
    assert usage.tenant == "metered" and set(usage.tokens) == {claims.jti}
    assert await ledger.token_seconds(claims.jti) == pytest.approx(usage.seconds)
    # windflow usage prints the same, per session and per tenant
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = await asyncio.to_thread(
            cli.main, ["usage", "--etcd", mesh.etcd.endpoint, "--tenant", "metered", "--json"]
        )
    printed = json.loads(out.getvalue())
    assert code == 0
    assert [(r["session_id"], r["seconds"]) for r in printed["sessions"]] == [
        (session.session_id, round(usage.seconds, 3))
    ]
    assert printed["tenants"] == {"metered": round(usage.seconds, 3)}
