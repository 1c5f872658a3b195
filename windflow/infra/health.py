"""Readiness probes: small async callables that say whether a child serves yet.

A probe returns ``True`` when the child is ready and ``False`` when it is not (yet); it
never raises for "not ready" (refused connection, timeout, NOT_SERVING). The supervisor
calls it repeatedly until it returns ``True`` or the child's ready timeout passes.
"""

from __future__ import annotations

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
