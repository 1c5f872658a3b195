"""The worker's usage publisher: records go out in order, a failed publish is retried
with the same record (its id de-duplicates it), and the queue is bounded."""

from __future__ import annotations

import asyncio

import pytest

from services.worker import metering
from services.worker.metering import UsagePublisher
from windflow.access.usage import UsageLog
from windflow.v1 import internal_pb2


class FlakyLog(UsageLog):
    """Fails the first ``failures`` publishes (as NATS does while it restarts)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[int] = []
        self.tries = 0

    async def publish(self, record: internal_pb2.UsageRecord) -> None:
        self.tries += 1
        if self.tries <= self.failures:
            raise TimeoutError("nats: timeout")
        self.published.append(record.second)


def records(*seconds: int) -> list[internal_pb2.UsageRecord]:
    return [internal_pb2.UsageRecord(session_id="s", second=s) for s in seconds]


async def test_records_are_retried_until_they_land_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metering, "RETRY_FIRST_S", 0.001)
    log = FlakyLog(failures=3)
    publisher = UsagePublisher(log)
    publisher.start()
    publisher.submit(records(0, 1, 2))
    await asyncio.wait_for(publisher.aclose(timeout_s=5.0), 6.0)
    assert log.published == [0, 1, 2]
    assert log.tries == 6 and publisher.published == 3 and publisher.lost == 0


async def test_the_queue_is_bounded_and_drops_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metering, "MAX_QUEUED", 3)
    log = FlakyLog(failures=0)
    publisher = UsagePublisher(log)  # not started: nothing drains it
    publisher.submit(records(0, 1, 2, 3, 4))
    assert publisher.lost == 2
    publisher.start()
    await asyncio.wait_for(publisher.aclose(), 6.0)
    assert log.published == [2, 3, 4]
