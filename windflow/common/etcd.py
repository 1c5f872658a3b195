"""etcd helpers: connecting, worker registration under a lease, reading the worker table."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time

from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.kv import KVService

from windflow.common import names
from windflow.v1 import internal_pb2

log = logging.getLogger(__name__)


async def connect(endpoint: str) -> Etcd3Client:
    """A client of etcd at ``endpoint`` (``host:port``, or several, comma-separated). A
    host may be a name (a Kubernetes Service, a compose service): it is resolved here, as
    the client dials IPv4 literals only; OSError names a host that does not resolve."""
    client = Etcd3Client(await resolve(endpoint), rpc_max_attempts=5)
    await client.connect()
    return client


async def resolve(endpoint: str) -> list[str]:
    """``host:port`` items with each host name replaced by its IPv4 addresses."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for item in (part.strip() for part in endpoint.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            try:
                infos = await loop.getaddrinfo(host, None, family=socket.AF_INET)
            except OSError as exc:
                raise OSError(f"etcd endpoint {item!r}: {host!r} does not resolve: {exc}") from exc
            for address in dict.fromkeys(info[4][0] for info in infos):
                out.append(f"{address}:{port}")
        else:
            out.append(item)
    return out


def kv(client: Etcd3Client) -> KVService:
    if client.kv is None:
        raise RuntimeError("etcd client is not connected")
    return client.kv


class LeasedKey:
    """A key kept alive under its own lease; it vanishes ``ttl`` seconds after we die.

    Lifecycle: ``await start(value)`` -> ``await update(value)`` any number of times ->
    ``await aclose()`` (revokes the lease: the key goes at once).
    """

    def __init__(self, client: Etcd3Client, key: str, ttl: int, heartbeat_s: float) -> None:
        self._client = client
        self._key = key
        self._ttl = ttl
        self._heartbeat_s = heartbeat_s
        self.lease_id = 0
        self.grants = 0
        """Leases granted so far: one more each time the lease lapsed and was granted
        anew (what it guarded may have moved meanwhile)."""
        self.valid_until = 0.0
        """Until when (monotonic) the lease surely holds: the newest grant or renewal
        that etcd answered, from when it was asked, plus the TTL it reported. Past it, the
        lease may have ended and what it guards may have moved (``StepEngine``'s fence)."""
        self._value = b""
        self._putting = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self, value: bytes) -> None:
        assert self._client.lease is not None
        asked = time.monotonic()
        grant = await self._client.lease.grant(self._ttl)
        self.lease_id = grant.ID
        self.grants += 1
        self.valid_until = asked + grant.TTL
        await self.update(value)
        self._task = asyncio.create_task(self._keepalive(), name=f"lease-keepalive:{self._key}")

    async def update(self, value: bytes) -> None:
        self._value = value
        await self._put()

    async def _put(self) -> None:
        """Put the newest value under the current lease. One put at a time, each of the
        value as it is when its turn comes: a re-registration racing an update can never
        land an older value after a newer one."""
        async with self._putting:
            await kv(self._client).put(self._key, self._value, lease=self.lease_id)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                # A round unanswered for a whole TTL is given up (the lease is lost by then
                # anyway): a stream that hangs must not stop the renewal for good.
                async with asyncio.timeout(self._ttl):
                    await self._renew()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                log.warning("lease keepalive for %s unanswered for %ds", self._key, self._ttl)
            except Exception:
                log.warning("lease keepalive for %s failed", self._key, exc_info=True)

    async def _renew(self) -> None:
        assert self._client.lease is not None
        asked = time.monotonic()
        stream = self._client.lease.keep_alive(self.lease_id)
        try:
            async for response in stream:
                if response.TTL <= 0:
                    log.error("lease for %s expired; re-registering", self._key)
                    asked = time.monotonic()
                    grant = await self._client.lease.grant(self._ttl)
                    self.lease_id = grant.ID
                    self.grants += 1
                    self.valid_until = asked + grant.TTL
                    await self._put()
                else:
                    self.valid_until = asked + response.TTL
                break
        finally:
            stream.cancel()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            assert self._client.lease is not None
            await self._client.lease.revoke(self.lease_id, timeout=2.0)


async def list_workers(client: Etcd3Client) -> list[internal_pb2.WorkerInfo]:
    prefix = names.WORKERS_PREFIX.encode()
    response = await kv(client).get(prefix, prefix_range_end(prefix))
    workers = []
    for item in response.kvs:
        info = internal_pb2.WorkerInfo()
        info.ParseFromString(item.value)
        workers.append(info)
    return workers
