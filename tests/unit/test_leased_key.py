"""A worker's registration (``LeasedKey``) under a lease that lapsed: the value etcd holds
in the end is the newest one given, whatever the order of the re-registration and of an
update racing it. (A chaos run found the worker's session count stuck at a stale value:
the re-registration's put of the old value landed after the update's put of the new.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from windflow.common.etcd import LeasedKey


@dataclass
class _Reply:
    ID: int = 0
    TTL: int = 0


class _Stream:
    """A keep-alive stream that says the lease is gone (TTL 0)."""

    def __aiter__(self) -> AsyncIterator[_Reply]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[_Reply]:
        yield _Reply(TTL=0)

    def cancel(self) -> None:
        pass


class _Lease:
    def __init__(self) -> None:
        self.granted = 0

    async def grant(self, ttl: int) -> _Reply:
        self.granted += 1
        return _Reply(ID=100 + self.granted, TTL=ttl)

    def keep_alive(self, lease_id: int) -> _Stream:
        return _Stream()


class _KV:
    """Puts land in call order, except the one ``hold`` names, which waits for ``go``."""

    def __init__(self) -> None:
        self.value = b""
        self.hold: bytes | None = None
        self.holding = asyncio.Event()
        self.go = asyncio.Event()

    async def put(self, key: str, value: bytes, lease: int = 0) -> None:
        if value == self.hold:
            self.hold = None
            self.holding.set()
            await self.go.wait()
        self.value = value


class _Client:
    def __init__(self) -> None:
        self.kv = _KV()
        self.lease = _Lease()


async def test_an_update_racing_a_re_registration_is_the_value_that_stays() -> None:
    client = _Client()
    key = LeasedKey(client, "/w", ttl=2, heartbeat_s=0.5)  # type: ignore[arg-type]
    await key.start(b"2 sessions")
    await key.aclose()  # (no keep-alive task: the test renews by hand)
    client.kv.hold = b"2 sessions"  # the re-registration's put is slow
    renew = asyncio.create_task(key._renew())  # the lease is gone: it registers again
    await client.kv.holding.wait()
    # the worker dropped its sessions meanwhile
    update = asyncio.create_task(key.update(b"0 sessions"))
    await asyncio.sleep(0.01)
    client.kv.go.set()
    await asyncio.gather(renew, update)
    assert client.kv.value == b"0 sessions"
    assert key.grants == 2


async def test_the_re_registration_carries_an_update_made_before_it() -> None:
    client = _Client()
    key = LeasedKey(client, "/w", ttl=2, heartbeat_s=0.5)  # type: ignore[arg-type]
    await key.start(b"a")
    await key.aclose()
    await key.update(b"b")
    await key._renew()
    assert client.kv.value == b"b"
