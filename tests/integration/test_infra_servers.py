"""Real etcd and nats-server through the launchers (the session fixtures in conftest)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import nats
from etcd3aio import Etcd3Client

from windflow.common.etcd import LeasedKey
from windflow.infra import EtcdServer, NatsServer, pid_alive


async def test_etcd_lease_expiry_removes_the_key(etcd_server: EtcdServer) -> None:
    key = f"/windflow/test/{uuid.uuid4().hex}"
    async with Etcd3Client([etcd_server.endpoint]) as client:
        assert client.kv is not None and client.lease is not None
        lease = await client.lease.grant(ttl=1)
        await client.kv.put(key, b"alive", lease=lease.ID)
        reply = await client.kv.get(key)
        assert [kv.value for kv in reply.kvs] == [b"alive"]
        for _ in range(100):  # the lease is never kept alive: etcd must drop the key
            if not (await client.kv.get(key)).kvs:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{key} still present 10 s after its 1 s lease")


async def test_leased_key_registers_again_after_its_lease_lapses(etcd_server: EtcdServer) -> None:
    """A registration whose lease ends under it (a stall past the TTL; here, revoked) is
    back, same value, new lease, within a heartbeat or two; closing it removes it at once."""
    key = f"/windflow/test/{uuid.uuid4().hex}"
    async with Etcd3Client([etcd_server.endpoint]) as client:
        assert client.kv is not None and client.lease is not None
        registration = LeasedKey(client, key, ttl=2, heartbeat_s=0.2)
        await registration.start(b"worker-info")
        first = registration.lease_id
        await client.lease.revoke(first)
        assert not (await client.kv.get(key)).kvs
        for _ in range(50):
            kvs = (await client.kv.get(key)).kvs
            if kvs:
                break
            await asyncio.sleep(0.05)
        assert [(kv.value, kv.lease) for kv in kvs] == [(b"worker-info", registration.lease_id)]
        assert registration.lease_id != first
        await registration.aclose()
        assert not (await client.kv.get(key)).kvs


async def test_nats_jetstream_publish_is_acked(nats_server: NatsServer) -> None:
    stream = f"TEST_{uuid.uuid4().hex[:8]}"
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.events", b"hello")
        assert (ack.stream, ack.seq) == (stream, 1)
        message = await js.get_msg(stream, 1)
        assert message.data == b"hello"
    finally:
        await client.close()


async def test_launchers_stop_their_process_and_close_twice(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path)
    nats_server = NatsServer(tmp_path)
    async with etcd, nats_server:
        assert etcd.process is not None and nats_server.process is not None
        pids = [etcd.process.pid, nats_server.process.pid]
        assert all(pid is not None and pid_alive(pid) for pid in pids)
        assert etcd.endpoint.startswith("127.0.0.1:")
        assert nats_server.url.startswith("nats://127.0.0.1:")
    await etcd.aclose()
    await nats_server.aclose()
    assert not any(pid_alive(pid) for pid in pids if pid is not None)
    assert (tmp_path / "etcd" / "member").is_dir()
    assert (tmp_path / "logs" / "nats.log").read_text().strip()
