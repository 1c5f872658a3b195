"""Router replicas: one leader, elected through etcd; the others forward to it.

The leader places, recovers, migrates and drains; a follower serves the same RPCs by
forwarding them (its clients need not know which replica leads). Leadership is etcd3aio's
``Election`` (a key under a lease; the lowest create revision leads), with the lease kept
alive here: the helper grants it but never renews it. Every placement the leader writes is
fenced by its election key (``fence``): the write's transaction also compares the key's
create revision, so a leader whose lease ran out (a stall, a partition) cannot write any
more, even before it notices. A follower campaigns all along and takes over within the
lease TTL of the leader's death.

Lifecycle: ``start()`` -> ``holds()``, ``fence()``, ``leader_address()`` -> ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.concurrency import _ELECTION_PREFIX, Election
from etcd3aio.kv import Compare, SortOrder, SortTarget

from windflow.common import etcd
from windflow.errors import Unavailable

log = logging.getLogger(__name__)

ELECTION = "windflow-v1-router"
RETRY_S = 0.5


class Leadership:
    def __init__(
        self,
        client: Etcd3Client,
        address: str,
        *,
        ttl: int,
        heartbeat_s: float,
        on_elected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self.address = address
        self._ttl = ttl
        self._heartbeat_s = heartbeat_s
        self._on_elected = on_elected
        self._election: Election | None = None
        self._key = b""
        self._create_revision = 0
        self._valid_until = 0.0
        self.terms = 0
        """Times this replica was elected."""
        self.elected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-election")

    def holds(self) -> bool:
        """This replica leads, and its lease surely holds now."""
        return bool(self._key) and time.monotonic() < self._valid_until

    def fence(self) -> Compare:
        """A transaction compare that holds only while this replica's election key lives
        (its lease not expired or revoked): add it to every placement write."""
        if not self._key:
            raise Unavailable("this router replica does not lead", retry_after_s=RETRY_S)
        return etcd.kv(self._client).txn_compare_create_revision(self._key, self._create_revision)

    async def leader_address(self) -> str:
        """The leading replica's address ('' while none leads)."""
        election = self._election or self._new_election()
        current = await election.leader()
        return current.kvs[0].value.decode() if current.kvs else ""

    def _new_election(self) -> Election:
        return self._client.election(ELECTION, value=self.address.encode(), ttl=self._ttl)

    async def _run(self) -> None:
        while True:
            try:
                await self._term()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("router election failed; campaigning again", exc_info=True)
            self._step_down()
            await asyncio.sleep(RETRY_S)

    async def _term(self) -> None:
        """Campaign, then lead while the lease is renewed; return when it is lost. The
        lease is kept alive from its grant on: a candidate waiting behind the leader keeps
        its place (its key would expire with an unrenewed lease)."""
        election = self._election = self._new_election()
        acquire = asyncio.create_task(election.__aenter__(), name="router-campaign")
        # etcd3aio grants the lease inside its campaign and says nothing: look for it
        while election._lease_id is None and not acquire.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if election._lease_id is None:
            acquire.result()  # it failed before its lease was granted
            return
        self._valid_until = time.monotonic() + self._ttl
        keep = asyncio.create_task(self._keep_alive(election._lease_id), name="router-lease")
        try:
            await asyncio.wait({acquire, keep}, return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                return  # the lease was lost while campaigning
            acquire.result()
            key = election._my_key
            assert key is not None
            mine = await etcd.kv(self._client).get(key)
            if not mine.kvs:
                raise Unavailable("the election key vanished as it was won")
            self._create_revision = mine.kvs[0].create_revision
            self._key = key
            self.terms += 1
            self.elected.set()
            log.info("this router (%s) leads now (term %d)", self.address, self.terms)
            if self._on_elected is not None:
                await self._on_elected()
            await keep
        finally:
            for task in (acquire, keep):
                task.cancel()
            await asyncio.gather(acquire, keep, return_exceptions=True)

    async def _keep_alive(self, lease_id: int) -> None:
        """Renew the lease every heartbeat; return once it is lost (etcd says so, or no
        renewal was answered within its term)."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            asked = time.monotonic()
            try:
                async with asyncio.timeout(max(0.1, self._valid_until - asked)):
                    ttl = await self._renew(lease_id)
            except TimeoutError:
                ttl = 0
            except Exception:
                log.warning("router lease renewal failed", exc_info=True)
                ttl = 0
            if ttl > 0:
                self._valid_until = asked + ttl
            elif ttl < 0 or time.monotonic() >= self._valid_until:
                if self._key:
                    log.error("this router's leadership lapsed (its lease expired)")
                return

    async def _renew(self, lease_id: int) -> int:
        """One keep-alive round; the TTL granted (<= 0: the lease is gone)."""
        assert self._client.lease is not None
        stream = self._client.lease.keep_alive(lease_id)
        try:
            async for response in stream:
                return int(response.TTL) if response.TTL > 0 else -1
        finally:
            stream.cancel()
        return 0

    def _step_down(self) -> None:
        if self._key:
            log.warning("this router (%s) no longer leads", self.address)
        self._key = b""
        self._create_revision = 0
        self._valid_until = 0.0
        self.elected.clear()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        election, self._election = self._election, None
        if election is not None and self._key:
            with contextlib.suppress(Exception):
                await election.__aexit__(None, None, None)  # resign: a follower takes over now
        self._step_down()


async def candidates(client: Etcd3Client) -> list[str]:
    """The addresses of the router replicas campaigning now, the leader first (the election
    key with the lowest create revision leads)."""
    prefix = f"{_ELECTION_PREFIX}/{ELECTION}/".encode()
    response = await etcd.kv(client).get(
        prefix,
        prefix_range_end(prefix),
        sort_order=SortOrder.ASCEND,
        sort_target=SortTarget.CREATE,
    )
    return [item.value.decode() for item in response.kvs]
