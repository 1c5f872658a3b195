"""The worker's gRPC servicer: translation only; the work is in ``WorkerRuntime``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.worker.runtime import WorkerRuntime
from windflow.errors import InvalidArgument, OutOfRange
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
        return self._runtime.close_session(
            request.session_id, if_idle_s=request.if_idle_s, epoch=request.epoch
        )

    async def ListSessions(
        self, request: internal_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.ListSessionsResponse:
        return internal_pb2.ListSessionsResponse(sessions=self._runtime.statuses())

    async def ParkSession(
        self, request: internal_pb2.ParkSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        return await self._runtime.reclaiming.park(request)

    async def FetchState(
        self, request: internal_pb2.FetchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[internal_pb2.StateChunk]:
        async for chunk in self._runtime.migrations.fetch_state(request):
            yield chunk

    async def MigrateOut(
        self, request: internal_pb2.MigrateOutRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.MigrationStatus:
        migrations = self._runtime.migrations
        op = internal_pb2.MigrateOutRequest
        if request.op == op.OP_STOP:
            return migrations.stop(request)
        if request.op == op.OP_RESUME:
            return migrations.resume(request)
        if request.op == op.OP_HANDOFF:
            return migrations.handoff(request)
        if request.op == op.OP_WAIT:
            return await migrations.wait(request)
        raise InvalidArgument(f"unknown MigrateOut op {request.op}")

    async def MigrateIn(
        self, request: internal_pb2.MigrateInRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.MigrationStatus:
        migrations = self._runtime.migrations
        op = internal_pb2.MigrateInRequest
        if request.op == op.OP_PREPARE:
            return await migrations.prepare(request)
        if request.op == op.OP_CATCH_UP:
            return await migrations.catch_up(request)
        if request.op == op.OP_COMMIT:
            return await migrations.commit(request)
        if request.op == op.OP_ABORT:
            return migrations.abort(request)
        raise InvalidArgument(f"unknown MigrateIn op {request.op}")

    async def SetDraining(
        self, request: internal_pb2.SetDrainingRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SetDrainingResponse:
        return internal_pb2.SetDrainingResponse(
            sessions=self._runtime.set_draining(request.draining)
        )
