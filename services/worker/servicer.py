"""The worker's gRPC servicer: translation only; the work is in ``WorkerRuntime``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.worker.runtime import WorkerRuntime
from windflow.errors import OutOfRange
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb


class WorkerServicer(internal_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    async def OpenSession(
        self, request: internal_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.OpenSessionResponse:
        model = await self._runtime.open_session(request)
        return internal_pb2.OpenSessionResponse(model=model, sessions=self._runtime.session_count)

    async def Attach(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        metadata = context.invocation_metadata() or ()
        async for message in self._runtime.attach(request_iterator, metadata):
            yield message

    async def Rewind(
        self, request: pb.RewindRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        if request.to_frame < 0:
            raise OutOfRange(f"cannot rewind to frame {request.to_frame}: frames start at 0")
        return await self._runtime.rewind(request.session_id, request.to_frame)

    async def Replay(
        self, request: internal_pb2.WorkerReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        async for frame in self._runtime.replay(request):
            yield frame

    async def GetSessionStatus(
        self, request: internal_pb2.GetSessionStatusRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        return self._runtime.status(request.session_id)

    async def CloseSession(
        self, request: internal_pb2.CloseWorkerSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        return self._runtime.close_session(request.session_id)
