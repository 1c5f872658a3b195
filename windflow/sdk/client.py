"""Asyncio client for the public windflow.v1 API."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from windflow.common import grpc_util, telemetry
from windflow.common.frames import decode_frame
from windflow.errors import FailedPrecondition, ResourceExhausted, WindflowError
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

FORMATS = {"jpeg": pb.FRAME_FORMAT_JPEG, "rgb": pb.FRAME_FORMAT_RGB}
POLICIES = {"drop_oldest": pb.OUTPUT_POLICY_DROP_OLDEST, "pause": pb.OUTPUT_POLICY_PAUSE}
QUALITY = {"adaptive": pb.QualityPolicy.MODE_ADAPTIVE, "fixed": pb.QualityPolicy.MODE_FIXED}


JIT_MARGIN_MS = 2.0
"""``send_just_in_time`` does not aim at a frame due sooner than this: the worker starts a
frame about a millisecond before its deadline, and the control has two hops to travel."""


class SessionStreamError(Exception):
    """The server refused one client message (the stream goes on); carries the status."""

    def __init__(self, error: pb.StreamError) -> None:
        super().__init__(f"{error.code_name}: {error.message}")
        self.error = error
        self.code_name = error.code_name


@dataclass(frozen=True, slots=True)
class ReceivedFrame:
    frame: pb.Frame
    received_us: int
    """The client's wall clock when the frame arrived (unix microseconds)."""

    @property
    def index(self) -> int:
        return self.frame.frame_index

    @property
    def latency_ms(self) -> float:
        """From the frame's deadline (when it was due to be made) to its arrival here."""
        return (self.received_us - self.frame.timestamps.due_us) / 1000.0

    @property
    def control_to_frame_ms(self) -> float | None:
        """From sending the control first applied in this frame to its arrival, if any."""
        sent = self.frame.control_client_time_us
        return (self.received_us - sent) / 1000.0 if sent else None

    def rgb(self) -> np.ndarray:
        f = self.frame
        return decode_frame(f.data, f.format, f.width, f.height)


class Session:
    """A live session stream. Use through ``Client.session(...)`` or ``Client.attach``.

    Lifecycle: ``await start()`` (sends Attach) -> ``send``/``frames`` -> ``aclose()``.
    Frames are acknowledged as they are consumed from ``frames()``, cumulatively: every
    ``ack_every``-th frame (a quarter of the window, at least 1), which leaves the worker
    at least three quarters of the window and spares the gateway and the worker most of
    the acks; server events go to ``events`` and refused messages to ``errors`` (bounded
    histories).
    """

    def __init__(
        self, stub: windflow_pb2_grpc.WindflowStub, info: pb.Session, *, window: int = 8
    ) -> None:
        self.info = info
        self.id = info.session_id
        self._stub = stub
        self._window = window
        self.ack_every = max(1, window // 4)
        self._acked = -1
        self._call: grpc.aio.StreamStreamCall | None = None
        self._writing = asyncio.Lock()
        """Held by the write under way: gRPC takes one write at a time on a call, and the
        lock's waiters go next in the order they came."""
        self.events: collections.deque[pb.SessionEvent] = collections.deque(maxlen=256)
        self.errors: collections.deque[pb.StreamError] = collections.deque(maxlen=256)
        self.last_index = -1
        self.next_index = 0
        self.fps = float(info.spec.fps or info.model.fps)
        """The session's output fps (follows quality changes; the gateway fills an unset
        spec fps with the model's native one, which is also the fallback here)."""
        self.next_due_us = 0
        """Deadline of the next frame on the worker's clock (unix us; 0 before a frame)."""
        self._closed = False

    async def start(
        self, controls: Sequence[tuple[int, int]] = (), *, resume_from: int | None = None
    ) -> None:
        """Attach; ``controls`` are (frame_index, action) pairs queued before any frame.
        ``resume_from``: resume a stream, its first frame exactly that index (the worker
        replays or goes back to it; ``Attach.resume``)."""
        now = telemetry.now_us()
        initial = [
            pb.Control(frame_index=index, action=action, client_time_us=now)
            for index, action in controls
        ]
        attach = pb.Attach(session_id=self.id, window=self._window, controls=initial)
        if resume_from is not None:
            attach.resume = True
            attach.resume_from = resume_from
        self._call = self._stub.Stream()
        await self._write(pb.ClientMessage(attach=attach))

    async def _write(self, message: pb.ClientMessage, *, quiet: bool = False) -> None:
        """Write ``message`` on the stream now, or after the writes already waiting (in
        order), by the caller's task: the caller learns what became of its message. A
        message over the gateway's size limit raises ResourceExhausted and is not sent
        (the stream goes on); a stream that has failed raises its typed error; one that
        has ended (closed, or ended by the server) raises FailedPrecondition. ``quiet``:
        drop the message instead of raising (acks: the stream's end reaches the reader)."""
        if self._call is None:
            raise RuntimeError("Session.send() before start()")
        size = message.ByteSize()
        if size > grpc_util.PUBLIC_MAX_MESSAGE_BYTES:  # refused here; the stream goes on
            raise ResourceExhausted(
                f"a {size}-byte message is over the gateway's limit of "
                f"{grpc_util.PUBLIC_MAX_MESSAGE_BYTES} bytes; it was not sent"
            )
        async with self._writing:
            try:
                if not self._closed:
                    await self._call.write(message)
                    return
            except grpc.aio.AioRpcError as exc:
                if quiet:
                    return
                raise grpc_util.error_from_rpc(exc) from exc
            except asyncio.InvalidStateError:  # the call has ended
                pass
        if not quiet:
            raise FailedPrecondition(f"the stream of session {self.id} has ended")

    async def send(
        self, action: int = 0, axes: Sequence[float] = (), frame_index: int | None = None
    ) -> int:
        """Send a control for ``frame_index`` (default: the next frame not yet received).

        Returns once it is written (after the messages written before it: controls are
        never dropped, and a sender faster than the stream waits); returns the frame index
        the control was stamped with.
        """
        index = self.next_index if frame_index is None else frame_index
        await self._write(
            pb.ClientMessage(
                control=pb.Control(
                    frame_index=index,
                    action=action,
                    axes=list(axes),
                    client_time_us=telemetry.now_us(),
                )
            )
        )
        return index

    async def just_in_time(self, lead_ms: float | None = None) -> int:
        """Wait until ``lead_ms`` before the deadline of the next frame a control can still
        shape, and return that frame's index: sample the input then and send it stamped
        with the index (``send_just_in_time`` does both). Input sampled as late as
        possible, as games do: a worker starts a frame up to a quarter interval early once
        its control is there, so the frame follows the control by about one model step.
        The default lead is a fifth of the frame interval (inside that quarter, with room
        for timer jitter both ways). Uses the deadline each frame carries, so it assumes
        the client's clock agrees with the worker's (NTP); returns at once before the
        first frame."""
        interval_us = 1e6 / self.fps
        lead_us = interval_us / 5.0 if lead_ms is None else lead_ms * 1000.0
        index, due = self.next_index, self.next_due_us
        if not due:
            return index
        while True:
            # a frame due within JIT_MARGIN_MS is being made already: aim at the next one
            while telemetry.now_us() > due - JIT_MARGIN_MS * 1000.0:
                due += int(interval_us)
                index += 1
            wait_s = (due - lead_us - telemetry.now_us()) / 1e6
            if wait_s <= 0:
                return index
            await asyncio.sleep(wait_s)  # and check again: a timer may wake us late

    async def send_just_in_time(
        self, action: int = 0, axes: Sequence[float] = (), lead_ms: float | None = None
    ) -> int:
        """``just_in_time`` then ``send`` stamped for that frame; returns its index."""
        index = await self.just_in_time(lead_ms)
        return await self.send(action, axes, frame_index=index)

    async def send_raw(self, message: pb.ClientMessage) -> None:
        await self._write(message)

    async def frames(self, limit: int | None = None) -> AsyncIterator[ReceivedFrame]:
        """Frames as they arrive, acknowledged once the consumer asks for the next one."""
        if self._call is None:
            raise RuntimeError("Session.frames() before start()")
        count = 0
        try:
            async for message in self._call:
                kind = message.WhichOneof("msg")
                if kind == "frame":
                    received = ReceivedFrame(message.frame, telemetry.now_us())
                    self.last_index = received.index
                    self.next_index = received.index + 1
                    ts = message.frame.timestamps
                    self.next_due_us = ts.next_due_us or ts.due_us + int(1e6 / self.fps)
                    yield received
                    if received.index - self._acked >= self.ack_every:
                        self._acked = received.index
                        await self._write(
                            pb.ClientMessage(ack=pb.Ack(frame_index=received.index)),
                            quiet=True,
                        )
                    count += 1
                    if limit is not None and count >= limit:
                        return
                elif kind == "event":
                    self.events.append(message.event)
                    if message.event.fps > 0:
                        self.fps = message.event.fps
                    if message.event.kind == pb.SessionEvent.KIND_ATTACHED:
                        self.next_index = max(self.next_index, message.event.frame_index)
                    if message.event.kind == pb.SessionEvent.KIND_REWOUND:
                        self.next_index = message.event.frame_index
                        self._acked = message.event.frame_index - 1  # a new future
                    if message.event.kind == pb.SessionEvent.KIND_CLOSED:
                        return
                elif kind == "error":
                    self.errors.append(message.error)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            raise grpc_util.error_from_rpc(exc) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._call is not None:
            self._call.cancel()


class Client:
    """Lifecycle: ``Client(address)`` -> use -> ``aclose()`` (or ``async with``)."""

    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        self.address = address
        self._timeout = timeout_s
        self._channel = grpc_util.channel(
            address, max_send_bytes=grpc_util.PUBLIC_MAX_MESSAGE_BYTES
        )
        self.stub = windflow_pb2_grpc.WindflowStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._channel.close()

    async def _unary(self, method: object, request: object) -> object:
        try:
            return await method(request, timeout=self._timeout)  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc) from exc

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self._unary(self.stub.ListModels, pb.ListModelsRequest())
        assert isinstance(response, pb.ListModelsResponse)
        return list(response.models)

    async def create_session(
        self,
        model_id: str,
        *,
        seed: int = 0,
        fps: float = 0.0,
        steps: int = 0,
        format: str = "jpeg",
        width: int = 0,
        height: int = 0,
        jpeg_quality: int = 0,
        region: str = "",
        output_policy: str = "drop_oldest",
        quality: str = "adaptive",
        min_steps: int = 0,
        min_fps: float = 0.0,
    ) -> pb.Session:
        """Create and place a session. ``quality``: "adaptive" (the worker may step it down
        its ladder to ``min_steps`` / ``min_fps`` under load) or "fixed"."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        if output_policy not in POLICIES:
            raise ValueError(f"output_policy must be one of {', '.join(POLICIES)}")
        if quality not in QUALITY:
            raise ValueError(f"quality must be one of {', '.join(QUALITY)}")
        spec = pb.SessionSpec(
            model_id=model_id,
            seed=seed,
            fps=fps,
            steps=steps,
            format=FORMATS[format],
            width=width,
            height=height,
            jpeg_quality=jpeg_quality,
            region=region,
            output_policy=POLICIES[output_policy],
            quality=pb.QualityPolicy(mode=QUALITY[quality], min_steps=min_steps, min_fps=min_fps),
        )
        response = await self._unary(self.stub.CreateSession, pb.CreateSessionRequest(spec=spec))
        assert isinstance(response, pb.CreateSessionResponse)
        return response.session

    async def get_session(self, session_id: str) -> pb.Session:
        response = await self._unary(
            self.stub.GetSession, pb.GetSessionRequest(session_id=session_id)
        )
        assert isinstance(response, pb.Session)
        return response

    async def close_session(self, session_id: str) -> pb.Session:
        response = await self._unary(
            self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id)
        )
        assert isinstance(response, pb.CloseSessionResponse)
        return response.session

    async def fork(self, session_id: str, at_frame: int) -> pb.Session:
        """A new session continuing from frame ``at_frame`` of ``session_id``."""
        response = await self._unary(
            self.stub.Fork, pb.ForkRequest(session_id=session_id, at_frame=at_frame)
        )
        assert isinstance(response, pb.Session)
        return response

    async def rewind(self, session_id: str, to_frame: int) -> pb.Session:
        """``session_id`` continues from ``to_frame``; its later log is truncated."""
        response = await self._unary(
            self.stub.Rewind, pb.RewindRequest(session_id=session_id, to_frame=to_frame)
        )
        assert isinstance(response, pb.Session)
        return response

    async def replay(
        self, session_id: str, from_frame: int, to_frame: int
    ) -> AsyncIterator[ReceivedFrame]:
        """Frames [from_frame, to_frame) re-rendered from checkpoints and the control log."""
        call = self.stub.Replay(
            pb.ReplayRequest(session_id=session_id, from_frame=from_frame, to_frame=to_frame)
        )
        try:
            async for frame in call:
                yield ReceivedFrame(frame, telemetry.now_us())
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc) from exc

    async def attach(
        self,
        session: pb.Session,
        *,
        window: int = 8,
        controls: Sequence[tuple[int, int]] = (),
        resume_from: int | None = None,
    ) -> Session:
        """Open the session's stream; ``controls`` are (frame_index, action) pairs applied
        atomically with the attach (see ``Attach.controls``); ``resume_from``: the stream
        starts exactly at that frame (``Attach.resume``), e.g. the one after the last a
        broken stream delivered."""
        live = Session(self.stub, session, window=window)
        await live.start(controls, resume_from=resume_from)
        return live

    @contextlib.asynccontextmanager
    async def session(
        self,
        model_id: str,
        *,
        window: int = 8,
        close: bool = True,
        controls: Sequence[tuple[int, int]] = (),
        **spec: object,
    ) -> AsyncIterator[Session]:
        """Create a session, attach its stream, and close both on exit."""
        info = await self.create_session(model_id, **spec)  # type: ignore[arg-type]
        live = await self.attach(info, window=window, controls=controls)
        try:
            yield live
        finally:
            await live.aclose()
            if close:
                with contextlib.suppress(WindflowError):
                    await self.close_session(info.session_id)
