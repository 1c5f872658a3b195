"""Readiness probes: small async callables that say whether a child serves yet.

A probe returns ``True`` when the child is ready and ``False`` when it is not (yet); it
never raises for "not ready" (refused connection, timeout, NOT_SERVING). The supervisor
calls it repeatedly until it returns ``True`` or the child's ready timeout passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ReadyProbe = Callable[[], Awaitable[bool]]
"""An async callable returning whether a child is ready."""


class GrpcHealthProbe:
    """Ready when ``grpc.health.v1.Health/Check`` for ``service`` answers SERVING.

    The empty service name is the server's overall health, the one every Windflow service
    sets to SERVING once it accepts work.
    """

    def __init__(self, address: str, *, service: str = "", timeout_s: float = 1.0) -> None:
        self.address = address
        self.service = service
        self.timeout_s = timeout_s

    async def __call__(self) -> bool:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout_s
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def __repr__(self) -> str:
        return f"GrpcHealthProbe({self.address!r}, service={self.service!r})"


class HttpHealthProbe:
    """Ready when ``GET path`` on ``host:port`` answers 200 (the browser bridge's
    ``/healthz``, which says 200 once it serves)."""

    def __init__(self, address: str, *, path: str = "/healthz", timeout_s: float = 1.0) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.path = path
        self.timeout_s = timeout_s

    async def __call__(self) -> bool:
        request = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(request.encode())
                    await writer.drain()
                    status = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False
        return status.split(b" ")[1:2] == [b"200"]

    def __repr__(self) -> str:
        return f"HttpHealthProbe({self.host}:{self.port}{self.path})"
