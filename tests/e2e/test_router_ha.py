"""Router replicas against the real stack: the leader dies (outright, or in the middle of a
live migration) and the other replica leads within the lease TTL; no session loses or
repeats a frame on the way."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import grpc
import nats
import pytest

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from tests.e2e.test_migration import SPEC, WORKER_ARGS, Player, _kinds, _replayed
from windflow.common import grpc_util, names
from windflow.sdk import Client
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

ELECTION_TTL_S = 2.0  # tests/e2e/mesh.py starts the routers with --election-ttl 2


async def _leader(mesh: Mesh) -> str:
    """The router replica leading now (it says so in its log)."""
    for _ in range(200):
        leading = [r for r in mesh.routers if "leads now" in mesh.log(r)]
        if leading:
            assert len(leading) == 1, leading
            return leading[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no router replica leads")


async def _migrate_until_served(
    router: internal_pb2_grpc.RouterStub, session_id: str
) -> tuple[internal_pb2.MigrationResult, float]:
    """Migrate through any replica, again while none leads; (result, seconds it took)."""
    t0 = time.monotonic()
    while True:
        try:
            result = await router.Migrate(
                internal_pb2.MigrateRequest(session_id=session_id), timeout=10
            )
            return result, time.monotonic() - t0
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - t0 > 15:
                raise
            await asyncio.sleep(0.1)


async def test_the_leader_dies_and_the_other_replica_leads_within_the_ttl(
    tmp_path: Path,
) -> None:
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS, routers=2) as mesh:
        leader = await _leader(mesh)
        follower = next(r for r in mesh.routers if r != leader)
        async with (
            Client(mesh.gateway) as client,
            grpc_util.channel(mesh.router) as channel,
        ):
            router = internal_pb2_grpc.RouterStub(channel)
            info = await client.create_session(DEFAULT_MODEL, seed=12, **SPEC)  # type: ignore[arg-type]
            live = await client.attach(info)
            play = Player(live, 120)
            await play.at(20)
            mesh.kill(leader)
            killed = time.monotonic()
            moved, _ = await _migrate_until_served(router, info.session_id)
            failover_s = time.monotonic() - killed
            assert moved.from_worker_id == info.worker_id
            assert "leads now" in mesh.log(follower)
            assert failover_s < ELECTION_TTL_S + 2.0, failover_s
            # new sessions are placed through the gateway's router channel, too
            fresh = await client.create_session(DEFAULT_MODEL, seed=13, **SPEC)  # type: ignore[arg-type]
            assert fresh.worker_id
            got = await play.task
            await live.aclose()
            assert [i for i, _, _ in got] == list(range(120))
            assert len(_kinds(live, pb.SessionEvent.KIND_MIGRATED)) == 1
            assert await _replayed(client, info.session_id, 120) == [d for _, d, _ in got]


@pytest.mark.parametrize("step", ["ready", "cutover"])
async def test_a_migration_whose_leader_dies_midway_ends_cleanly(tmp_path: Path, step: str) -> None:
    """The leader is SIGKILLed as its migration reaches ``step``: before the placement
    moved (``ready``: the source may be stopped already; it goes on by itself within its
    stop TTL) or after (``cutover``: the target commits when the gateway attaches, the
    source leaves by its own TTL). Either way the stream gets every frame once, equal to
    Replay, and the other replica leads."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS, routers=2) as mesh:
        leader = await _leader(mesh)
        events = await nats.connect(mesh.nats.url)
        reached = asyncio.Event()

        async def on_step(_: object) -> None:
            if not reached.is_set():
                reached.set()
                mesh.kill(leader)

        await events.subscribe(f"{names.SUBJECT_MIGRATION}.{step}", cb=on_step)
        try:
            async with (
                Client(mesh.gateway) as client,
                grpc_util.channel(mesh.addresses[leader]) as channel,
            ):
                info = await client.create_session(DEFAULT_MODEL, seed=14, **SPEC)  # type: ignore[arg-type]
                live = await client.attach(info)
                play = Player(live, 150)
                await play.at(20)
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    await internal_pb2_grpc.RouterStub(channel).Migrate(
                        internal_pb2.MigrateRequest(session_id=info.session_id), timeout=10
                    )
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE  # its router died
                assert reached.is_set()
                got = await play.task
                await live.aclose()
                assert [i for i, _, _ in got] == list(range(150))
                gaps = [b[2] - a[2] for a, b in itertools.pairwise(got)]
                assert max(gaps) < 4.0  # at most a stopped source's time to live
                assert not _kinds(live, pb.SessionEvent.KIND_RECOVERED)
                assert await _replayed(client, info.session_id, 150) == [d for _, d, _ in got]
                placed = await client.get_session(info.session_id)
                if step == "cutover":
                    assert placed.worker_id != info.worker_id
                    assert len(_kinds(live, pb.SessionEvent.KIND_MIGRATED)) == 1
                # the placement and the worker holding it agree (GetSession asks it)
                assert placed.head_frame >= 150
                await _leader_other_than(mesh, leader)
        finally:
            await events.close()


async def _leader_other_than(mesh: Mesh, dead: str) -> None:
    for _ in range(100):
        if any("leads now" in mesh.log(r) for r in mesh.routers if r != dead):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no other replica took over")
