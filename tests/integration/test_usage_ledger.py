"""The usage ledger against a real etcd: each record applied once, keyed by its stream
sequence, and each frame of a session billed once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from etcd3aio import Etcd3Client, prefix_range_end

from windflow.access.usage import USAGE_PREFIX, Ledger
from windflow.common import etcd
from windflow.infra.etcd import EtcdServer
from windflow.v1 import internal_pb2


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[Etcd3Client]:
    client = await etcd.connect(etcd_server.endpoint)
    prefix = USAGE_PREFIX.encode()
    await etcd.kv(client).delete(prefix, prefix_range_end(prefix))  # a ledger of its own
    yield client
    await client.close()


def record(lo: int, hi: int) -> internal_pb2.UsageRecord:
    return internal_pb2.UsageRecord(
        session_id="s1",
        tenant="acme",
        token_id="jti-1",
        model_id="m",
        second=lo // 24,
        frames_per_second=24,
        first_frame=lo,
        end_frame=hi,
        unix_ms=60_000,
    )


async def test_a_record_delivered_again_is_skipped_and_overlaps_bill_once(
    client: Etcd3Client,
) -> None:
    ledger = Ledger(client)
    assert await ledger.apply_record(record(0, 24), seq=1) == 24
    assert await ledger.apply_record(record(0, 24), seq=1) == 0  # redelivered after a crash
    assert ledger.skipped == 1
    # a recovery's overlap: another worker sent frames 12.. again, under a new sequence
    assert await ledger.apply_record(record(12, 36), seq=2) == 12
    usage = await ledger.session("s1")
    assert usage is not None and usage.frames == 36 and usage.ranges == [(0, 36)]
    assert await ledger.token_seconds("jti-1") == pytest.approx(1.5)
    (tenant,) = await ledger.totals("tenants")
    assert (tenant.name, tenant.seconds) == ("acme", pytest.approx(1.5))


async def test_two_ledgers_applying_one_record_bill_it_once(client: Etcd3Client) -> None:
    one, two = Ledger(client), Ledger(client)
    added = await asyncio.gather(
        one.apply_record(record(0, 24), seq=7), two.apply_record(record(0, 24), seq=7)
    )
    assert sorted(added) == [0, 24]
    assert await one.token_seconds("jti-1") == pytest.approx(1.0)
