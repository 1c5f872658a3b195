"""Asyncio client for the public windflow.v1 API."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from windflow.common import env, grpc_util, telemetry
from windflow.common.frames import decode_frame, encode_frame
from windflow.errors import FailedPrecondition, ResourceExhausted, Unavailable, WindflowError
from windflow.sdk.resume import (
    CHANNEL_OPTIONS,
    RESUME_TIMEOUT_S,
    PendingControls,
    parse_addresses,
    retry_delay_s,
)
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

FORMATS = {"jpeg": pb.FRAME_FORMAT_JPEG, "rgb": pb.FRAME_FORMAT_RGB}
POLICIES = {"drop_oldest": pb.OUTPUT_POLICY_DROP_OLDEST, "pause": pb.OUTPUT_POLICY_PAUSE}
QUALITY = {"adaptive": pb.QualityPolicy.MODE_ADAPTIVE, "fixed": pb.QualityPolicy.MODE_FIXED}
CLASSES = {"interactive": pb.SESSION_CLASS_INTERACTIVE, "lockstep": pb.SESSION_CLASS_LOCKSTEP}


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

    Resume: when the stream ends UNAVAILABLE (its gateway was killed, is restarting,
    refuses connections), ``frames()`` attaches again by itself, through the next of
    ``gateways`` (round robin, the same one when there is one), with ``Attach.resume`` at
    the frame after the last one received and the controls sent for later frames that
    the server did not refuse; it tries with a short backoff until ``resume_timeout_s``
    after the failure (0: never), then raises Unavailable. Frames come with no gap and no
    repeat (an index at or below the last one yielded is dropped). Each resume counts in
    ``resumes`` and leaves a local KIND_RECOVERED event in ``events``. Other errors end
    the stream as before.
    """

    def __init__(
        self,
        stub: windflow_pb2_grpc.WindflowStub,
        info: pb.Session,
        *,
        window: int = 8,
        gateways: Sequence[tuple[str, windflow_pb2_grpc.WindflowStub]] = (),
        resume_timeout_s: float = RESUME_TIMEOUT_S,
        metadata: tuple[tuple[str, str], ...] = (),
        role: pb.Role.ValueType = pb.ROLE_CONTROLLER,
    ) -> None:
        """``gateways``: (address, stub) of every gateway a resume may go through, in
        order, ``stub``'s first (default: ``stub`` alone). ``role``: attach as the
        session's controller, or as a read-only spectator (``Client.spectate``)."""
        self.info = info
        self.role = role
        """Its role now: a Handover moves it (KIND_ROLE_CHANGED)."""
        self.viewer_id = ""
        """Its id among the session's viewers (from KIND_ATTACHED): what a Handover names."""
        self.controller_id = ""
        """The session's controller's viewer id, as last announced ("" for none)."""
        self.id = info.session_id
        self._stub = stub
        self._gateways = list(gateways) or [("", stub)]
        self._gateway = next(
            (i for i, (_, candidate) in enumerate(self._gateways) if candidate is stub), 0
        )
        self.resume_timeout_s = resume_timeout_s
        self._metadata = metadata
        """The call metadata of every stream it opens (the session token)."""
        self.resumes = 0
        """Times the stream was resumed after its gateway went away."""
        self._controls = PendingControls()
        self._positioned = False
        """``next_index`` is where the stream stands (it was attached, or started at a
        ``resume_from``): a resume continues there; before that, one attaches afresh."""
        self._floor = -1
        """The last frame index yielded: nothing at or below it is yielded again (back
        down only when the session rewinds)."""
        self._outage: _Outage | None = None
        """The resume under way: set at the failure, cleared by the new stream's first
        message."""
        self._failure: WindflowError | None = None
        """Why ``frames()`` gave the stream up (a write then raises it)."""
        self._window = window
        self.ack_every = max(1, window // 4)
        self._acked = -1
        self._call: grpc.aio.StreamStreamCall | None = None
        self._writing = asyncio.Lock()
        """Held by the write under way: gRPC takes one write at a time on a call, and the
        lock's waiters go next in the order they came."""
        self.events: collections.deque[pb.SessionEvent] = collections.deque(maxlen=256)
        self.errors: collections.deque[pb.StreamError] = collections.deque(maxlen=256)
        self.receipts: collections.deque[pb.ControlReceipt] = collections.deque(maxlen=256)
        """The server's receipts of accepted controls, newest last."""
        self._awaiting: dict[int, asyncio.Future[pb.ControlReceipt]] = {}
        """``send_confirmed`` calls waiting, by their control's client_time_us."""
        self.last_index = -1
        self.next_index = 0
        self.fps = float(info.spec.fps or info.model.fps)
        """The session's output fps (follows quality changes; the gateway fills an unset
        spec fps with the model's native one, which is also the fallback here)."""
        self.next_due_us = 0
        """Deadline of the next frame on the worker's clock (unix us; 0 before a frame)."""
        self._closed = False

    @property
    def gateway(self) -> str:
        """The address of the gateway the stream goes through now ("" when unknown)."""
        return self._gateways[self._gateway][0]

    async def start(
        self,
        controls: Sequence[tuple[int, int] | pb.Control] = (),
        *,
        resume_from: int | None = None,
    ) -> None:
        """Attach; ``controls`` (frame_index, action) pairs, or whole ``Control`` messages
        (``make_control``: prompts, poses, input frames), queued before any frame.
        ``resume_from``: resume a stream, its first frame exactly that index (the worker
        replays or goes back to it; ``Attach.resume``)."""
        now = telemetry.now_us()
        initial = []
        for item in controls:
            control = pb.Control()
            if isinstance(item, pb.Control):
                control.CopyFrom(item)
            else:
                control.frame_index, control.action = item
            control.client_time_us = control.client_time_us or now
            initial.append(control)
        attach = pb.Attach(
            session_id=self.id, window=self._window, controls=initial, role=self.role
        )
        if resume_from is not None:
            attach.resume = True
            attach.resume_from = resume_from
            self.next_index = max(self.next_index, resume_from)
            self._positioned = True
        for control in initial:
            self._controls.sent(control)
        self._call = self._stub.Stream(metadata=self._metadata)
        await self._write(pb.ClientMessage(attach=attach))

    async def _write(self, message: pb.ClientMessage, *, quiet: bool = False) -> None:
        """Write ``message`` on the stream now, or after the writes already waiting (in
        order), by the caller's task: the caller learns what became of its message. A
        message over the gateway's size limit raises ResourceExhausted and is not sent
        (the stream goes on); a stream that has failed raises its typed error; one that
        has ended (closed, or ended by the server) raises FailedPrecondition. ``quiet``:
        drop the message instead of raising (acks: the stream's end reaches the reader).
        A control is remembered first: on a stream that went UNAVAILABLE it is kept for
        the resume's Attach (``frames()`` resumes; nothing raises here unless it gave up)."""
        if self._call is None:
            raise RuntimeError("Session.send() before start()")
        size = message.ByteSize()
        if size > grpc_util.PUBLIC_MAX_MESSAGE_BYTES:  # refused here; the stream goes on
            raise ResourceExhausted(
                f"a {size}-byte message is over the gateway's limit of "
                f"{grpc_util.PUBLIC_MAX_MESSAGE_BYTES} bytes; it was not sent"
            )
        async with self._writing:
            if self._failure is not None and not self._closed:
                if quiet:
                    return
                raise self._failure
            is_control = message.HasField("control")
            if is_control and not self._closed:
                self._controls.sent(message.control)
            call = self._call
            try:
                if not self._closed:
                    await call.write(message)
                    return
            except grpc.aio.AioRpcError as exc:
                if quiet or (is_control and self._resumable(exc.code())):
                    return
                raise grpc_util.error_from_rpc(exc) from exc
            except asyncio.InvalidStateError:  # the call has ended
                if is_control and not self._closed and self._resumable(await call.code()):
                    return
        if not quiet:
            raise FailedPrecondition(f"the stream of session {self.id} has ended")

    async def send(
        self,
        action: int = 0,
        axes: Sequence[float] = (),
        frame_index: int | None = None,
        *,
        prompt: str | None = None,
        pose: Sequence[float] | None = None,
        frame: np.ndarray | pb.InputFrame | None = None,
    ) -> int:
        """Send a control for ``frame_index`` (default: the next frame not yet received).

        ``prompt``, ``pose`` and ``frame`` (an input frame: uint8 RGB (H, W, 3), sent as
        JPEG, or an ``InputFrame`` as it is) go only to a model whose
        ``ModelInfo.controls`` declares them; each left None keeps the one in effect.
        Returns once it is written (after the messages written before it: controls are
        never dropped, and a sender faster than the stream waits); returns the frame index
        the control was stamped with. A message over the gateway's limit (a large input
        frame) raises ResourceExhausted and is not sent.
        """
        index = self.next_index if frame_index is None else frame_index
        control = make_control(index, action, axes, prompt=prompt, pose=pose, frame=frame)
        control.client_time_us = telemetry.now_us()
        await self._write(pb.ClientMessage(control=control))
        return index

    async def send_confirmed(
        self,
        action: int = 0,
        axes: Sequence[float] = (),
        frame_index: int | None = None,
        *,
        prompt: str | None = None,
        pose: Sequence[float] | None = None,
        frame: np.ndarray | pb.InputFrame | None = None,
        timeout_s: float = 5.0,
    ) -> pb.ControlReceipt:
        """``send``, then wait for the server's answer: its receipt (the frame the control
        applies from), or, when it is refused, the refusal raised as its typed error. The
        answer comes on the stream: ``frames()`` must be read meanwhile (it is what takes
        it)."""
        index = self.next_index if frame_index is None else frame_index
        control = make_control(index, action, axes, prompt=prompt, pose=pose, frame=frame)
        now = telemetry.now_us()
        while now in self._awaiting:  # (one answer per client_time_us)
            now += 1
        control.client_time_us = now
        answer: asyncio.Future[pb.ControlReceipt] = asyncio.get_running_loop().create_future()
        self._awaiting[now] = answer
        try:
            await self._write(pb.ClientMessage(control=control))
            return await asyncio.wait_for(answer, timeout_s)
        finally:
            self._awaiting.pop(now, None)

    def _answered(
        self, client_time_us: int, receipt: pb.ControlReceipt | None, error: WindflowError | None
    ) -> None:
        waiting = self._awaiting.get(client_time_us)
        if waiting is None or waiting.done():
            return
        if error is not None:
            waiting.set_exception(error)
        elif receipt is not None:
            waiting.set_result(receipt)

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

    @property
    def spectating(self) -> bool:
        return self.role == pb.ROLE_SPECTATOR

    async def handover(self, viewer_id: str = "") -> None:
        """Hand the controller role to the spectator ``viewer_id`` (from the controller), or
        take it (a spectator, ``viewer_id`` its own or "", while no controller is
        attached). The answer comes on the stream: KIND_ROLE_CHANGED, or a StreamError
        (NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED) in ``errors``."""
        await self._write(pb.ClientMessage(handover=pb.Handover(viewer_id=viewer_id)))

    async def send_raw(self, message: pb.ClientMessage) -> None:
        await self._write(message)

    async def frames(self, limit: int | None = None) -> AsyncIterator[ReceivedFrame]:
        """Frames as they arrive, acknowledged once the consumer asks for the next one;
        resumed through another gateway (or the same one, back) when it goes away."""
        if self._call is None:
            raise RuntimeError("Session.frames() before start()")
        count = 0
        while not self._closed:
            try:
                async for message in self._call:
                    if self._outage is not None:
                        self._resumed()
                    kind = message.WhichOneof("msg")
                    if kind == "frame":
                        received = ReceivedFrame(message.frame, telemetry.now_us())
                        if received.index <= self._floor:
                            continue  # a repeat (a resume overlapping what came)
                        self._floor = received.index
                        self._positioned = True
                        self.last_index = received.index
                        self.next_index = received.index + 1
                        self._controls.received(received.index)
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
                            self._positioned = True
                            self.viewer_id = message.event.viewer_id
                            if not self.spectating:
                                self.controller_id = message.event.viewer_id
                        if message.event.kind == pb.SessionEvent.KIND_ROLE_CHANGED:
                            self.role = message.event.role
                            self.controller_id = message.event.viewer_id
                            self._acked = self.last_index  # its window starts over here
                        if message.event.kind == pb.SessionEvent.KIND_REWOUND:
                            self.next_index = message.event.frame_index
                            self._acked = message.event.frame_index - 1  # a new future
                            self._floor = message.event.frame_index - 1
                            self._positioned = True
                            self._controls.rewound()
                        if message.event.kind == pb.SessionEvent.KIND_CLOSED:
                            return
                    elif kind == "error":
                        self.errors.append(message.error)
                        if message.error.HasField("control"):
                            self._controls.refused(message.error.control)  # never re-sent
                            self._answered(
                                message.error.control.client_time_us,
                                None,
                                grpc_util.error_from_status(
                                    message.error.code_name, message.error.message
                                ),
                            )
                    elif kind == "receipt":
                        self.receipts.append(message.receipt)
                        self._answered(message.receipt.client_time_us, message.receipt, None)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                    return
                error = grpc_util.error_from_rpc(exc)
                if not self._resumable(exc.code()):
                    self._failure = error
                    raise error from exc
                try:
                    await self._resume(error)
                except WindflowError as gave_up:
                    self._failure = gave_up
                    raise gave_up from exc

    def _resumable(self, code: grpc.StatusCode | None) -> bool:
        """Whether a stream that ended with ``code`` is resumed: UNAVAILABLE (its gateway
        went away) while resuming is on. Anything else is the server's answer."""
        return code == grpc.StatusCode.UNAVAILABLE and self.resume_timeout_s > 0

    async def _resume(self, error: WindflowError) -> None:
        """Attach again through the next gateway, after the pause this outage's attempt
        count calls for; raise Unavailable once the outage has lasted ``resume_timeout_s``.
        Returns once the Attach is written (or its call failed: reading it says how)."""
        loop = asyncio.get_running_loop()
        outage = self._outage
        if outage is None:
            outage = self._outage = _Outage(
                reason=error.message,
                started=loop.time(),
                deadline=loop.time() + self.resume_timeout_s,
                from_gateway=self.gateway,
            )
        left = outage.deadline - loop.time()
        if left <= 0:
            tried = ", ".join(address or "its gateway" for address, _ in self._gateways)
            raise Unavailable(
                f"the stream of session {self.id} ended ({outage.reason}) and could not be "
                f"resumed through {tried} in {self.resume_timeout_s:g} s "
                f"({outage.attempts} attempt(s)): {error.message}"
            )
        delay = min(retry_delay_s(outage.attempts), left)  # (the last try at the deadline)
        if delay > 0:
            await asyncio.sleep(delay)
        outage.attempts += 1
        self._gateway = (self._gateway + 1) % len(self._gateways)
        _, stub = self._gateways[self._gateway]
        call = stub.Stream(metadata=self._metadata)
        async with self._writing:  # after the writes under way: their controls count
            if self._closed:
                call.cancel()
                return
            # (a spectator attaches afresh: it sees the frames as they are made)
            resume_from = self.next_index if self._positioned and not self.spectating else None
            attach = pb.Attach(
                session_id=self.id,
                role=self.role,
                window=self._window,
                controls=self._controls.to_resend(
                    self.next_index - 1 if resume_from is not None else -1
                ),
            )
            if resume_from is not None:
                attach.resume = True
                attach.resume_from = resume_from
                # the worker's window starts over there: the acks' cadence with it
                self._acked = resume_from - 1
            outage.resume_from = resume_from
            self._stub = stub
            self._call = call
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(pb.ClientMessage(attach=attach))  # (a failure: read it)

    def _resumed(self) -> None:
        """The resumed stream answered: count the resume and say so in ``events``."""
        outage = self._outage
        assert outage is not None
        self._outage = None
        self.resumes += 1
        took_ms = (asyncio.get_running_loop().time() - outage.started) * 1000.0
        where = (
            f"at frame {outage.resume_from}"
            if outage.resume_from is not None
            else "afresh (it had not attached yet)"
        )
        self.events.append(
            pb.SessionEvent(
                kind=pb.SessionEvent.KIND_RECOVERED,
                message=(
                    f"stream resumed through gateway {self.gateway or '(same)'} {where} after "
                    f"{took_ms:.0f} ms and {outage.attempts} attempt(s); gateway "
                    f"{outage.from_gateway or '(same)'} had failed: {outage.reason}"
                ),
                frame_index=outage.resume_from if outage.resume_from is not None else 0,
            )
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._call is not None:
            self._call.cancel()


@dataclass(slots=True)
class _Outage:
    """One stream outage while it is being resumed (``Session._resume``)."""

    reason: str
    started: float
    deadline: float
    from_gateway: str
    attempts: int = 0
    resume_from: int | None = None


class Client:
    """Lifecycle: ``Client(address)`` -> use -> ``aclose()`` (or ``async with``).

    ``address``: one gateway's ``host:port``, or several (a sequence, or one string of
    comma-separated addresses). Calls go to the first; a session's stream resumes through
    the others in turn when its gateway goes away (``Session``), trying for
    ``resume_timeout_s`` (0: never resume; the stream's UNAVAILABLE is raised at once).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        timeout_s: float = 30.0,
        resume_timeout_s: float = RESUME_TIMEOUT_S,
        token: str | None = None,
    ) -> None:
        """``token``: the session token every call carries (default: $WINDFLOW_TOKEN;
        none against a gateway run with ``--insecure``)."""
        self.addresses = parse_addresses(address)
        token = env.TOKEN.get() if token is None else token
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.address = self.addresses[0]
        self.resume_timeout_s = resume_timeout_s
        self._timeout = timeout_s
        self._channels = [
            grpc_util.channel(
                a,
                max_send_bytes=grpc_util.PUBLIC_MAX_MESSAGE_BYTES,
                extra_options=CHANNEL_OPTIONS,
            )
            for a in self.addresses
        ]
        self._channel = self._channels[0]
        self._stubs = [windflow_pb2_grpc.WindflowStub(c) for c in self._channels]
        self.stub = self._stubs[0]

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _unary(self, method: object, request: object) -> object:
        try:
            return await method(  # type: ignore[operator]
                request, timeout=self._timeout, metadata=self.metadata
            )
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
        output_policy: str = "",
        quality: str = "adaptive",
        min_steps: int = 0,
        min_fps: float = 0.0,
        session_class: str = "interactive",
    ) -> pb.Session:
        """Create and place a session. ``quality``: "adaptive" (the worker may step it down
        its ladder to ``min_steps`` / ``min_fps`` under load) or "fixed". ``output_policy``:
        "drop_oldest", "pause", or "" for the class's default (drop_oldest for an
        interactive session, pause for a lockstep one). ``session_class``: "interactive" or
        "lockstep" (no clock: a frame as soon as its control is in; docs/simulation.md)."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        if output_policy and output_policy not in POLICIES:
            raise ValueError(f"output_policy must be one of {', '.join(POLICIES)}")
        if quality not in QUALITY:
            raise ValueError(f"quality must be one of {', '.join(QUALITY)}")
        if session_class not in CLASSES:
            raise ValueError(f"session_class must be one of {', '.join(CLASSES)}")
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
            output_policy=POLICIES.get(output_policy, pb.OUTPUT_POLICY_UNSPECIFIED),
            quality=pb.QualityPolicy(mode=QUALITY[quality], min_steps=min_steps, min_fps=min_fps),
            session_class=CLASSES[session_class],
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

    async def fork_many(self, session_id: str, at_frame: int, count: int) -> list[pb.Session]:
        """``count`` forks of ``session_id`` at frame ``at_frame``, in one call (all made or
        none): branches from one state for search and evaluation."""
        response = await self._unary(
            self.stub.ForkMany,
            pb.ForkManyRequest(session_id=session_id, at_frame=at_frame, count=count),
        )
        assert isinstance(response, pb.ForkManyResponse)
        return list(response.sessions)

    async def rollouts(
        self,
        session_id: str,
        at_frame: int,
        actions: Sequence[Sequence[int]],
        *,
        keep: bool = False,
    ) -> list[list[ReceivedFrame]]:
        """Run each action sequence from frame ``at_frame`` of ``session_id`` on a branch of
        its own (``fork_many``; lockstep sessions run as fast as the worker batches them)
        and return each branch's frames, ``actions[i][k]`` applied to frame ``at_frame + k``.
        The branches are closed afterwards unless ``keep``."""
        branches = await self.fork_many(session_id, at_frame, len(actions))

        async def run(branch: pb.Session, script: Sequence[int]) -> list[ReceivedFrame]:
            live = await self.attach(
                branch, controls=[(at_frame + k, a) for k, a in enumerate(script)]
            )
            try:
                return [frame async for frame in live.frames(limit=len(script))]
            finally:
                await live.aclose()

        try:
            return list(
                await asyncio.gather(
                    *(run(b, script) for b, script in zip(branches, actions, strict=True))
                )
            )
        finally:
            if not keep:
                for branch in branches:
                    with contextlib.suppress(WindflowError):
                        await self.close_session(branch.session_id)

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
            pb.ReplayRequest(session_id=session_id, from_frame=from_frame, to_frame=to_frame),
            metadata=self.metadata,
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
        controls: Sequence[tuple[int, int] | pb.Control] = (),
        resume_from: int | None = None,
        role: pb.Role.ValueType = pb.ROLE_CONTROLLER,
    ) -> Session:
        """Open the session's stream (as its controller, or ``role`` a spectator:
        ``spectate``); ``controls`` are (frame_index, action) pairs or ``Control``
        messages (``make_control``) applied atomically with the attach (see
        ``Attach.controls``); ``resume_from``: the stream starts exactly at that frame
        (``Attach.resume``), e.g. the one after the last a broken stream delivered. The
        stream resumes by itself when its gateway goes away (``Session``)."""
        live = Session(
            self.stub,
            session,
            window=window,
            gateways=list(zip(self.addresses, self._stubs, strict=True)),
            resume_timeout_s=self.resume_timeout_s,
            metadata=self.metadata,
            role=role,
        )
        await live.start(controls, resume_from=resume_from)
        return live

    async def spectate(self, session: pb.Session, *, window: int = 2) -> Session:
        """Watch a live session, read-only: its frames as they are made (the newest first
        when this reader is slow, at most ``window`` frames in flight; it never holds the
        session back). ``handover()`` asks for the controller role."""
        return await self.attach(session, window=window, role=pb.ROLE_SPECTATOR)

    @contextlib.asynccontextmanager
    async def session(
        self,
        model_id: str,
        *,
        window: int = 8,
        close: bool = True,
        controls: Sequence[tuple[int, int] | pb.Control] = (),
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


INPUT_JPEG_QUALITY = 90


def input_frame(
    rgb: np.ndarray, fmt: pb.FrameFormat.ValueType = pb.FRAME_FORMAT_JPEG
) -> pb.InputFrame:
    """An input frame message from uint8 RGB (H, W, 3): JPEG (quality 90) or raw RGB."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an input frame is uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    data = encode_frame(rgb, fmt, width, height, INPUT_JPEG_QUALITY)
    return pb.InputFrame(data=data, format=fmt, width=width, height=height)


def make_control(
    index: int,
    action: int = 0,
    axes: Sequence[float] = (),
    *,
    prompt: str | None = None,
    pose: Sequence[float] | None = None,
    frame: np.ndarray | pb.InputFrame | None = None,
) -> pb.Control:
    """A control message; the richer kinds only where given."""
    control = pb.Control(frame_index=index, action=action, axes=list(axes))
    if prompt is not None:
        control.prompt = prompt
    if pose is not None:
        control.pose.values.extend(pose)
    if isinstance(frame, pb.InputFrame):
        control.frame.CopyFrom(frame)
    elif frame is not None:
        control.frame.CopyFrom(input_frame(frame))
    return control
