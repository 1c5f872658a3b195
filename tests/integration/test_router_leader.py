"""Router replicas' election against a real etcd: one leads, the other takes over within
the lease TTL when it goes, and a leader whose lease ran out can write no placement."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from etcd3aio import Etcd3Client

from services.router.leader import Leadership
from windflow.common import etcd
from windflow.errors import Unavailable
from windflow.infra import EtcdServer

TTL = 2


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[Etcd3Client]:
    client = await etcd.connect(etcd_server.endpoint)
    try:
        yield client
    finally:
        await client.close()


async def _fenced_put(client: Etcd3Client, leader: Leadership, key: str) -> bool:
    kvs = etcd.kv(client)
    reply = await kvs.txn(compare=[leader.fence()], success=[kvs.txn_op_put(key, b"x")])
    return bool(reply.succeeded)


async def _leading(*replicas: Leadership, within: float) -> Leadership:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for replica in replicas:
            if replica.holds():
                return replica
        await asyncio.sleep(0.02)
    raise AssertionError(f"no replica led within {within} s")


async def test_one_leads_the_other_takes_over_and_the_old_one_is_fenced(
    client: Etcd3Client,
) -> None:
    elected: list[str] = []

    def replica(address: str) -> Leadership:
        async def on_elected() -> None:
            elected.append(address)

        return Leadership(client, address, ttl=TTL, heartbeat_s=0.3, on_elected=on_elected)

    a, b = replica("a:1"), replica("b:1")
    key = f"/test/leader/{uuid.uuid4().hex}"
    a.start()
    try:
        assert await _leading(a, within=5) is a
        b.start()
        await asyncio.sleep(TTL)  # renewed all along: a keeps leading
        assert a.holds() and not b.holds()
        assert await b.leader_address() == "a:1" == await a.leader_address()
        assert await _fenced_put(client, a, key)
        with pytest.raises(Unavailable):
            b.fence()  # a follower has no fence: it cannot write placements

        # a's lease ends behind its back (as a stall past the TTL would have it): its
        # writes fail at once, b leads within the TTL, and a steps down when it notices
        assert a._election is not None and a._election._lease_id is not None
        stale = a.fence()
        assert client.lease is not None
        t0 = time.monotonic()
        await client.lease.revoke(a._election._lease_id)
        kvs = etcd.kv(client)
        late = await kvs.txn(compare=[stale], success=[kvs.txn_op_put(key, b"stale")])
        assert not late.succeeded
        assert await _leading(b, within=TTL + 1) is b
        assert time.monotonic() - t0 <= TTL + 1
        assert await _fenced_put(client, b, key)
        for _ in range(100):
            if not a.holds():
                break
            await asyncio.sleep(0.05)
        assert not a.holds()
        assert elected == ["a:1", "b:1"]
        # a campaigns again and follows; when b resigns, a leads at once
        await b.aclose()
        assert await _leading(a, within=TTL + 1) is a
        assert elected == ["a:1", "b:1", "a:1"]
    finally:
        await a.aclose()
        await b.aclose()
