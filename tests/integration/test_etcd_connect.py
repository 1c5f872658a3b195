"""windflow.common.etcd.connect against a real etcd: an endpoint named by a host name (a
Kubernetes Service, a compose service) works like an IP literal."""

from __future__ import annotations

import socket

import pytest

from windflow.common import etcd
from windflow.infra import EtcdServer


@pytest.mark.asyncio
async def test_a_host_name_endpoint_connects(etcd_server: EtcdServer) -> None:
    name = socket.gethostname()  # (etcd listens on 127.0.0.1: the name must lead there)
    if "127.0.0.1" not in {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}:
        pytest.skip(f"this machine's name {name!r} does not resolve to 127.0.0.1")
    port = etcd_server.endpoint.rsplit(":", 1)[1]
    client = await etcd.connect(f"{name}:{port}")
    try:
        await etcd.kv(client).put(b"/test/etcd-connect", b"named")
        got = await etcd.kv(client).get(b"/test/etcd-connect")
        assert got.kvs[0].value == b"named"
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_an_unknown_host_name_is_a_clear_error() -> None:
    with pytest.raises(OSError, match=r"no-such-host\.invalid"):
        await etcd.connect("no-such-host.invalid:2379")
