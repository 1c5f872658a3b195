"""The worker's usage publisher: the records its sessions' meters close (``UsageMeter``)
go to JetStream off the hot path, retried until they land (windflow/access/usage.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from windflow.access.usage import UsageLog
from windflow.v1 import internal_pb2

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
MAX_QUEUED = 100_000
"""Records held while NATS is unreachable (about a day of one session's seconds, or a
quarter hour of a hundred sessions'); past it the oldest go, logged, unbilled."""


class UsagePublisher:
    """Lifecycle: ``start()`` -> ``submit(...)`` any number of times -> ``aclose()``
    (publishes what is queued, within a deadline)."""

    def __init__(self, usage_log: UsageLog) -> None:
        self._log = usage_log
        self._queue: collections.deque[internal_pb2.UsageRecord] = collections.deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.lost = 0

    @property
    def queued(self) -> int:
        """Records waiting to be published."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-publisher")

    def submit(self, records: list[internal_pb2.UsageRecord]) -> None:
        for record in records:
            if len(self._queue) >= MAX_QUEUED:
                self._queue.popleft()
                self.lost += 1
                if self.lost == 1 or self.lost % 1000 == 0:
                    log.error("usage records dropped unpublished: %d so far", self.lost)
            self._queue.append(record)
        if records:
            self._empty.clear()
            self._ready.set()

    async def _run(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            await self._ready.wait()
            while self._queue:
                record = self._queue[0]
                try:
                    await self._log.publish(record)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # NATS down or slow: the same id again later
                    log.warning("usage record not published (%s); retrying", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                delay = RETRY_FIRST_S
                self._queue.popleft()
                self.published += 1
            self._ready.clear()
            self._empty.set()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        if self._queue:
            log.error("%d usage records unpublished at shutdown", len(self._queue))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
