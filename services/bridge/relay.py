"""One browser WebSocket relayed to one public ``Stream`` of the gateway (docs/browser.md).

The protocol is the gRPC stream's: each WebSocket message is one ``ClientMessage`` in
(binary protobuf; with ``?format=json``, its JSON text) and one ``ServerMessage`` out. The
first message must be ``Attach``. The token travels as ``Authorization: Bearer ...`` or,
from a browser (which cannot set that header on a WebSocket), as ``?token=``; the bridge
passes it on and the gateway checks it.

Flow: a WebSocket has no flow control of its own, so the bridge is the stream's gRPC
client: it acknowledges frames as it takes them, and keeps only the **newest frame** for a
browser that reads slower than the session's fps (older ones are dropped, counted into the
frame's ``dropped_total``). Events and errors are never dropped; neither are controls (each
is written to the gateway in order, the socket read again only once it is). Acks from the
browser are accepted and not needed.

Ending: a gRPC status ends the socket with close code 4000 + the status code (4003
INVALID_ARGUMENT, 4005 NOT_FOUND, 4016 UNAUTHENTICATED ...), after a last ``StreamError``
message saying why; a malformed message 1007, an oversize one 1009.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence

import grpc
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from windflow.common import metrics
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

log = logging.getLogger(__name__)

CLOSE_STATUS_BASE = 4000
"""Close code of a socket whose stream ended with a gRPC status: this + the code."""


WEBSOCKET = {"transport": "websocket"}


class Outbound:
    """What goes to the browser next: every event and error, in order, and the newest
    frame only (pure but for the event that wakes the sender)."""

    def __init__(self) -> None:
        self._others: collections.deque[pb.ServerMessage] = collections.deque()
        self._frame: pb.ServerMessage | None = None
        self.dropped = 0
        self.ready = asyncio.Event()
        """Something waits to be sent."""
        self.empty = asyncio.Event()
        self.empty.set()
        """Everything put was taken."""

    def put(self, message: pb.ServerMessage) -> None:
        if message.HasField("frame"):
            if self._frame is not None:
                self.dropped += 1
                metrics.get().bridge_frames_dropped.add(1, WEBSOCKET)
            self._frame = message
        else:
            self._others.append(message)
        self.ready.set()
        self.empty.clear()

    def take(self) -> pb.ServerMessage | None:
        """The next message to send (events before a waiting frame), None when empty."""
        if self._others:
            return self._others.popleft()
        frame, self._frame = self._frame, None
        if frame is None:
            self.ready.clear()
            self.empty.set()
            return None
        frame.frame.dropped_total += self.dropped
        return frame


class Relay:
    """Lifecycle: ``Relay(socket, stub, ...)`` -> ``await run()`` (returns when either side
    ends; everything it started is stopped)."""

    def __init__(
        self,
        socket: web.WebSocketResponse,
        stub: windflow_pb2_grpc.WindflowStub,
        metadata: Sequence[tuple[str, str]],
        *,
        json_mode: bool,
    ) -> None:
        self._socket = socket
        self._stub = stub
        self._metadata = tuple(metadata)
        self._json = json_mode
        self._call: grpc.aio.StreamStreamCall | None = None
        self._writing = asyncio.Lock()
        """gRPC takes one write at a time on a call: the browser's messages and the acks."""
        self.outbound = Outbound()
        self._close: tuple[int, str] = (WSCloseCode.OK, "")
        self._status: grpc.aio.AioRpcError | None = None
        """How the gateway ended the stream (a read's or a write's failure, whichever
        says more)."""

    def _decode(self, data: str | bytes) -> pb.ClientMessage:
        message = pb.ClientMessage()
        if isinstance(data, str):
            json_format.Parse(data, message)
        else:
            message.ParseFromString(data)
        return message

    def _encode(self, message: pb.ServerMessage) -> str | bytes:
        if self._json:
            return json_format.MessageToJson(message, indent=None)
        return message.SerializeToString()

    async def _write(self, message: pb.ClientMessage) -> None:
        assert self._call is not None
        async with self._writing:
            await self._call.write(message)

    async def run(self) -> None:
        try:
            # the token first (one unary call): a stream the gateway refuses at its start
            # races the Attach's write, and grpc-python may report that race, not the status
            await self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self._ended(exc)
            message = self.outbound.take()
            if message is not None:
                await self._send(message)
            code, reason = self._close
            await self._socket.close(code=code, message=reason.encode()[:120])
            return
        self._call = self._stub.Stream(metadata=self._metadata)
        tasks = [
            asyncio.create_task(self._from_browser(), name="bridge:from-browser"),
            asyncio.create_task(self._from_gateway(), name="bridge:from-gateway"),
            asyncio.create_task(self._to_browser(), name="bridge:to-browser"),
        ]
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
            # the other side ends with it (a write that lost a race with the call's end reads
            # as INTERNAL: the other side's failure says the real status)
            await asyncio.wait(tasks[:2], timeout=0.5)
            if self._status is not None:
                self._ended(self._status)
            # what the gateway said last (its error) still reaches the browser
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.outbound.empty.wait(), 1.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._call.cancel()
            code, reason = self._close
            await self._socket.close(code=code, message=reason.encode()[:120])

    async def _from_browser(self) -> None:
        async for received in self._socket:
            if received.type == WSMsgType.ERROR:
                self._close = (WSCloseCode.MESSAGE_TOO_BIG, "message over the bridge's limit")
                return
            if received.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                continue
            try:
                message = self._decode(received.data)
            except (json_format.ParseError, DecodeError, ValueError) as exc:
                self._close = (WSCloseCode.INVALID_TEXT, f"malformed ClientMessage: {exc}"[:120])
                return
            if message.HasField("ack"):
                continue  # the bridge acknowledges frames itself
            try:
                await self._write(message)  # in order; never dropped
            except grpc.aio.AioRpcError as exc:
                self._failed(exc)
                return
            except (grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the stream ended: its status comes from the other side
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            assert self._call is not None
            await self._call.done_writing()

    async def _from_gateway(self) -> None:
        assert self._call is not None
        try:
            async for message in self._call:
                self.outbound.put(message)
                if message.HasField("frame"):
                    ack = pb.Ack(frame_index=message.frame.frame_index)
                    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                        await self._write(pb.ClientMessage(ack=ack))
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)

    def _failed(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        if self._status is None or _broken(self._status):
            self._status = exc

    def _ended(self, exc: grpc.aio.AioRpcError) -> None:
        """The stream's status: a last StreamError to the browser, and the close code."""
        code = exc.code()
        error = pb.StreamError(
            code=code.value[0], code_name=code.name, message=exc.details() or code.name
        )
        self.outbound.put(pb.ServerMessage(error=error))
        self._close = (CLOSE_STATUS_BASE + code.value[0], error.message[:120])

    async def _to_browser(self) -> None:
        while True:
            await self.outbound.ready.wait()
            message = self.outbound.take()
            if message is not None:
                await self._send(message)

    async def _send(self, message: pb.ServerMessage) -> None:
        data = self._encode(message)
        if isinstance(data, str):
            await self._socket.send_str(data)
        else:
            await self._socket.send_bytes(data)


def _broken(exc: grpc.aio.AioRpcError) -> bool:
    """grpc-python's report of a write that raced with the call's end, not its status."""
    return exc.code() == grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core"
