"""The worker's actor host: opens, attaches and closes session actors over the engine.

The gRPC servicer only translates to and from this class. Lifecycle: construct ->
``start()`` -> serve -> ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from opentelemetry import trace

from services.worker import admission
from services.worker.actor import SessionActor
from services.worker.config import WorkerConfig
from services.worker.engine import StepEngine
from services.worker.models.base import WorldModel
from windflow.common import names, telemetry
from windflow.common.specs import model_info_to_proto, resolve_spec
from windflow.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    WindflowError,
)
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

_STATUS_NUMBER = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "OUT_OF_RANGE": 11,
    "FAILED_PRECONDITION": 9,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "DATA_LOSS": 15,
}


def stream_error(err: WindflowError, frame_index: int) -> pb.ServerMessage:
    return pb.ServerMessage(
        error=pb.StreamError(
            code=_STATUS_NUMBER.get(err.code, 2),
            code_name=err.code,
            message=err.message,
            frame_index=frame_index,
        )
    )


class WorkerRuntime:
    def __init__(
        self,
        config: WorkerConfig,
        models: Mapping[str, WorldModel],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.models = dict(models)
        self.engine = StepEngine(
            self.models,
            horizon_s=config.batch_horizon_ms / 1000.0,
            step_threads=config.step_threads,
            memory_budget_bytes=int(config.memory_budget_mb * 2**20),
            on_quality_change=on_change,
        )
        self._on_change = on_change
        self._generation = 0
        self._attach_owner: dict[str, int] = {}
        self.address = ""
        self.started_ms = int(time.time() * 1000)

    def start(self) -> asyncio.Task[None]:
        return self.engine.start()

    @property
    def session_count(self) -> int:
        return len(self.engine.sessions)

    def info(self) -> internal_pb2.WorkerInfo:
        n = len(self.engine.sessions)
        return internal_pb2.WorkerInfo(
            worker_id=self.config.worker_id,
            address=self.address,
            region=self.config.region,
            models=[model_info_to_proto(m.info) for m in self.models.values()],
            capacity=self.config.capacity,
            sessions=n,
            load=n / self.config.capacity,
            started_unix_ms=self.started_ms,
            utilization=self.engine.quality.utilization() or 0.0,
            admitted_utilization=self.engine.quality.utilization(floor=True) or 0.0,
            target_utilization=self.config.target_utilization,
            headroom=admission.headroom(self.engine, self.models, self.config.target_utilization),
            frames_dropped=self.engine.frames_dropped,
            deadline_misses=self.engine.quality.deadline_misses,
            quality_changes=self.engine.quality.quality_changes,
            fps_admission=self.config.fps_admission,
        )

    def _actor(self, session_id: str) -> SessionActor:
        actor = self.engine.sessions.get(session_id)
        if actor is None:
            raise NotFound(f"session {session_id!r} is not on worker {self.config.worker_id}")
        return actor

    # ---- unary operations ----

    def open_session(self, request: internal_pb2.OpenSessionRequest) -> pb.ModelInfo:
        model = self.models.get(request.spec.model_id)
        if model is None:
            raise NotFound(
                f"model {request.spec.model_id!r} is not loaded on worker {self.config.worker_id}"
            )
        info = model_info_to_proto(model.info)
        existing = self.engine.sessions.get(request.session_id)
        if existing is not None:
            existing.epoch = max(existing.epoch, request.epoch)
            return info
        if len(self.engine.sessions) >= self.config.capacity:
            raise ResourceExhausted(
                f"worker {self.config.worker_id} is full ({self.config.capacity} sessions)",
                retry_after_s=1.0,
            )
        spec = resolve_spec(request.spec, info)
        if self.config.fps_admission:
            admission.check(
                self.engine,
                spec,
                info,
                self.config.target_utilization,
                self.config.admission_retry_after_s,
                self.config.worker_id,
            )
        actor = SessionActor(
            request.session_id,
            spec,
            model,
            model.new_state(spec.seed),
            epoch=request.epoch,
            window=self.config.window,
            out_queue=self.config.out_queue,
            max_pending_controls=self.config.max_pending_controls,
            now=time.monotonic(),
        )
        self.engine.add(actor)
        log.info(
            "opened session %s (%s, %.1f fps, %d steps)",
            request.session_id,
            spec.model_id,
            spec.fps,
            spec.steps,
            extra={"session_id": request.session_id},
        )
        self._on_change()
        return info

    def status(self, session_id: str) -> internal_pb2.SessionStatus:
        actor = self._actor(session_id)
        return internal_pb2.SessionStatus(
            session_id=session_id,
            head_frame=actor.next_frame,
            dropped=actor.dropped,
            attached=actor.attached,
            steps=actor.steps,
            fps=1.0 / actor.interval,
            deadline_misses=self.engine.quality.misses(session_id),
        )

    def close_session(self, session_id: str) -> internal_pb2.SessionStatus:
        status = self.status(session_id)
        actor = self.engine.remove(session_id)
        if actor is not None:
            actor.push(
                pb.ServerMessage(
                    event=pb.SessionEvent(
                        kind=pb.SessionEvent.KIND_CLOSED,
                        message="session closed",
                        frame_index=actor.next_frame,
                    )
                )
            )
        self._on_change()
        log.info("closed session %s", session_id, extra={"session_id": session_id})
        return status

    # ---- the stream ----

    async def attach(
        self,
        requests: AsyncIterator[pb.ClientMessage],
        metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> AsyncIterator[pb.ServerMessage]:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream closed before its Attach message") from None
        if not first.HasField("attach"):
            raise InvalidArgument("the first message on a stream must be Attach")
        session_id = first.attach.session_id
        actor = self._actor(session_id)
        if first.attach.window > 64:
            raise InvalidArgument(f"window {first.attach.window} is outside 1..64")
        actor.add_controls(list(first.attach.controls))  # all or none; a refusal fails attach
        self._generation += 1
        generation = self._generation
        self._attach_owner[session_id] = generation  # a newer stream takes the session over
        actor.attach(first.attach.window)
        actor.due = max(actor.due, time.monotonic())
        self.engine.wake()
        reader = asyncio.create_task(
            self._read_client(actor, requests), name=f"client-reader:{session_id}"
        )
        span = tracer.start_span(
            names.SPAN_WORKER_SESSION,
            context=telemetry.extract_metadata(metadata),
            attributes={
                "windflow.session_id": session_id,
                "windflow.worker": self.config.worker_id,
            },
        )
        actor.trace_context = trace.set_span_in_context(span)
        try:
            yield pb.ServerMessage(
                event=pb.SessionEvent(
                    kind=pb.SessionEvent.KIND_ATTACHED,
                    message=f"attached on worker {self.config.worker_id}",
                    frame_index=actor.next_frame,
                    steps=actor.steps,
                    fps=1.0 / actor.interval,
                    level=self.engine.quality.level(session_id)[0],
                )
            )
            while self._attach_owner.get(session_id) == generation:
                while actor.can_send() and self._attach_owner.get(session_id) == generation:
                    message = actor.pop()
                    if message.HasField("frame"):
                        sent = telemetry.now_us()
                        message.frame.timestamps.worker_sent_us = sent
                        message.frame.latency.send_ms = (
                            sent - message.frame.timestamps.encoded_us
                        ) / 1000.0
                    yield message
                if actor.closed and not actor.out:
                    return
                if reader.done() and not reader.cancelled() and reader.exception() is not None:
                    return
                actor.frame_available.clear()
                if actor.can_send() or (actor.closed and not actor.out):
                    continue
                await actor.frame_available.wait()
        finally:
            span.end()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if self._attach_owner.get(session_id) == generation:
                del self._attach_owner[session_id]
                actor.detach()

    async def _read_client(
        self, actor: SessionActor, requests: AsyncIterator[pb.ClientMessage]
    ) -> None:
        async for message in requests:
            kind = message.WhichOneof("msg")
            if kind == "control":
                try:
                    actor.add_control(message.control)
                    self.engine.control_arrived(actor, message.control.frame_index)
                except WindflowError as err:
                    actor.push(stream_error(err, message.control.frame_index))
            elif kind == "ack":
                actor.ack(message.ack.frame_index)
            else:
                bad = InvalidArgument(f"unexpected {kind or 'empty'} message after Attach")
                actor.push(stream_error(bad, actor.next_frame))

    async def aclose(self) -> None:
        for session_id in list(self.engine.sessions):
            self.engine.remove(session_id)
        await self.engine.aclose()
