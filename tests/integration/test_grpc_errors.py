"""The one error interceptor: typed errors become the right gRPC status on a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from windflow import errors
from windflow.common.grpc_util import RETRY_AFTER_KEY, ServiceServer, error_from_rpc
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc


class Failing(windflow_pb2_grpc.WindflowServicer):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        raise self.exc

    async def Stream(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        yield pb.ServerMessage(event=pb.SessionEvent(message="first"))
        raise self.exc


CASES = [
    (errors.NotFound("no such session"), grpc.StatusCode.NOT_FOUND),
    (errors.InvalidControl("action 9 is outside"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.OutOfRange("beyond the head"), grpc.StatusCode.OUT_OF_RANGE),
    (errors.SnapshotError("truncated"), grpc.StatusCode.DATA_LOSS),
    (errors.SnapshotVersionMismatch("other model"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted("full", retry_after_s=1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError("a bug"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("exc", "code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
async def test_unary_and_stream_errors_map_to_status(exc: Exception, code: grpc.StatusCode) -> None:
    server = ServiceServer("127.0.0.1:0")
    server.add(
        windflow_pb2_grpc.add_WindflowServicer_to_server,
        Failing(exc),  # type: ignore[abstract]
        "windflow.v1.Windflow",
    )
    address = await server.start()
    await server.set_serving()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = windflow_pb2_grpc.WindflowStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.GetSession(pb.GetSessionRequest(session_id="x"))
            assert unary.value.code() == code
            assert str(exc) in (unary.value.details() or "")
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for message in stub.Stream(iter([pb.ClientMessage()])):
                    received.append(message.event.message)
            assert received == ["first"]
            assert streamed.value.code() == code
            back = error_from_rpc(unary.value)
            if isinstance(exc, errors.WindflowError):
                assert back.code == exc.code
                assert back.retry_after_s == exc.retry_after_s
            metadata = dict(unary.value.trailing_metadata() or ())
            assert (RETRY_AFTER_KEY in metadata) == (
                getattr(exc, "retry_after_s", None) is not None
            )
    finally:
        await server.aclose()


async def test_oversize_request_is_resource_exhausted() -> None:
    server = ServiceServer("127.0.0.1:0", max_receive_bytes=1024)
    server.add(
        windflow_pb2_grpc.add_WindflowServicer_to_server,
        Failing(errors.NotFound("x")),  # type: ignore[abstract]
        "windflow.v1.Windflow",
    )
    address = await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = windflow_pb2_grpc.WindflowStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetSession(pb.GetSessionRequest(session_id="x" * 4096))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.aclose()
