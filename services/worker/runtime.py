"""The worker's actor host: opens, attaches and closes session actors over the engine.

The gRPC servicer only translates to and from this class. Lifecycle: construct ->
``start()`` -> serve -> ``aclose()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from opentelemetry import trace

from services.worker import admission
from services.worker.actor import OUT_MESSAGES_MAX, SessionActor
from services.worker.config import WorkerConfig
from services.worker.engine import StepEngine
from services.worker.journal import Inputs, Journal, applied_at, replay_steps
from services.worker.messages import event, receipt, stream_error
from services.worker.metering import UsagePublisher
from services.worker.migration import Migrations
from services.worker.models.base import SessionState, WorldModel
from services.worker.reclaiming import Reclaiming
from services.worker.replay import BatchedReplay
from services.worker.viewers import SPECTATOR_WINDOW, Viewer, new_viewer_id
from windflow.access.usage import UsageMeter
from windflow.common import metrics, names, telemetry
from windflow.common.durable import Fenced, StoredEntry, controls_by_frame
from windflow.common.frames import encode_frame
from windflow.common.specs import model_info_to_proto, resolve_spec
from windflow.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    WindflowError,
)
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

CLAIM_ATTEMPTS = 3
"""Restores of one OpenSession when its CLAIM loses to a last append of the previous owner
(an owner still appending is a stalled or partitioned worker catching up: its appends
stop at the first CLAIM that lands, and its frames at its placement check)."""

COMMIT_WAIT_S = 15.0
"""How long a stream attaching to a session migrating here waits for its commit (a
migration's own time to live is shorter: ``migration.INCOMING_TTL_S``)."""
CONTROLLER_WAIT_S = 0.5
"""How long a second controller's attach waits for the attached one to leave (a stream
ending as the next begins) before it is refused."""


class WorkerRuntime:
    def __init__(
        self,
        config: WorkerConfig,
        models: Mapping[str, WorldModel],
        on_change: Callable[[], None] = lambda: None,
        journal: Journal | None = None,
    ) -> None:
        self.config = config
        self.models = dict(models)
        self.journal = journal
        self.engine = StepEngine(
            self.models,
            horizon_s=config.batch_horizon_ms / 1000.0,
            step_threads=config.step_threads,
            pipeline_depth=config.pipeline_depth,
            memory_budget_bytes=int(config.memory_budget_mb * 2**20),
            on_quality_change=on_change,
            journal=journal,
        )
        if journal is not None:
            journal.replayer = BatchedReplay(self.engine.in_step_thread, self.engine.max_batch)
        self._opening = 0
        self._on_change = on_change
        self._draining = False
        self.cordoned = False
        """Takes no new session (a drain by live migration: ``set_draining``)."""
        self.migrations = Migrations(self)
        self.reclaiming = Reclaiming(self)
        self._recheck: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        """Background work it owns (a detached session's HEAD entry)."""
        self.address = ""
        self.started_ms = int(time.time() * 1000)
        self.usage: UsagePublisher | None = None
        """Where the sessions' usage records go (None: not metered)."""
        self.delivered: collections.Counter[str] = collections.Counter()
        """Frames sent to sessions' controllers, by model."""
        self._metrics = metrics.get()
        self._model_attrs = {model_id: {"model": model_id} for model_id in self.models}
        """Each model's metric attributes, built once (the per-frame path reuses them)."""
        if self._metrics.live:
            self._observe(self._metrics)

    def _observe(self, m: metrics.Metrics) -> None:
        """The figures the metrics read at collection time: they cost nothing per frame."""

        def by_model(count: Callable[[SessionActor], bool]) -> list[tuple[float, dict[str, str]]]:
            tally = collections.Counter(
                a.spec.model_id for a in list(self.engine.sessions.values()) if count(a)
            )
            return [(tally[mid], attrs) for mid, attrs in self._model_attrs.items()]

        m.sessions_active.add(lambda: by_model(lambda a: True))
        m.sessions_attached.add(lambda: by_model(lambda a: a.attached))
        m.frames_delivered.add(
            lambda: [(self.delivered[mid], attrs) for mid, attrs in self._model_attrs.items()]
        )
        quality = self.engine.quality
        m.deadline_misses.add(
            lambda: [(quality.misses_by_model[mid], a) for mid, a in self._model_attrs.items()]
        )
        m.quality_changes.add(
            lambda: [(quality.changes_by_direction[d], {"direction": d}) for d in ("down", "up")]
        )
        m.frames_dropped.add(lambda: [(self.engine.frames_dropped, {})])
        m.input_frames_dropped.add(lambda: [(self.engine.input_dropped, {})])
        m.worker_utilization.add(lambda: [(quality.utilization() or 0.0, {})])

        def queues() -> list[tuple[float, dict[str, str]]]:
            actors = list(self.engine.sessions.values())
            return [
                (sum(len(a.out) for a in actors), {"queue": "frames_out"}),
                (sum(a.pending_controls for a in actors), {"queue": "controls_pending"}),
                (self.usage.queued if self.usage else 0, {"queue": "usage_records"}),
            ]

        m.queue_depth.add(queues)
        for reason in ("full", "fps", "draining", "stopping"):
            m.admission_refusals.add(0, {"reason": reason})

    def start(self) -> asyncio.Task[None]:
        if self.config.recheck_idle_s > 0:
            self._recheck = asyncio.create_task(
                self.engine.recheck_while_idle(self.config.recheck_idle_s, self._on_change),
                name="worker-idle-recheck",
            )
        return self.engine.start()

    @property
    def session_count(self) -> int:
        return len(self.engine.sessions)

    @property
    def occupied(self) -> int:
        """Slots taken: sessions held, being opened, and migrating here."""
        return len(self.engine.sessions) + self._opening + len(self.migrations.incoming)

    @property
    def stopping(self) -> bool:
        return self._draining

    def changed(self) -> None:
        """The worker's published info changed (sessions, draining): re-register it."""
        self._on_change()

    def set_draining(self, draining: bool) -> int:
        """Take no new session (``draining``) or take them again; returns sessions held."""
        if self.cordoned != draining:
            self.cordoned = draining
            log.info(
                "worker %s %s",
                self.config.worker_id,
                "draining" if draining else "takes sessions again",
            )
            self._on_change()
        return len(self.engine.sessions)

    def info(self) -> internal_pb2.WorkerInfo:
        n = len(self.engine.sessions)
        return internal_pb2.WorkerInfo(
            worker_id=self.config.worker_id,
            address=self.address,
            region=self.config.region,
            models=[model_info_to_proto(m.info) for m in self.models.values()],
            # draining: no free slot
            capacity=n if self._draining or self.cordoned else self.config.capacity,
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
            draining=self._draining or self.cordoned,
        )

    def actor(self, session_id: str) -> SessionActor:
        actor = self.engine.sessions.get(session_id)
        if actor is None:
            raise NotFound(f"session {session_id!r} is not on worker {self.config.worker_id}")
        return actor

    # ---- unary operations ----

    def durable(self) -> Journal:
        if self.journal is None:
            raise FailedPrecondition(f"worker {self.config.worker_id} keeps no durable state")
        return self.journal

    async def open_session(self, request: internal_pb2.OpenSessionRequest) -> pb.ModelInfo:
        model = self.models.get(request.spec.model_id)
        if model is None:
            raise NotFound(
                f"model {request.spec.model_id!r} is not loaded on worker {self.config.worker_id}"
            )
        if self._draining:
            self._metrics.admission_refusals.add(1, {"reason": "stopping"})
            raise Unavailable(f"worker {self.config.worker_id} is shutting down")
        if self.cordoned:
            self._metrics.admission_refusals.add(1, {"reason": "draining"})
            raise Unavailable(f"worker {self.config.worker_id} is draining")
        info = model_info_to_proto(model.info)
        existing = self.engine.sessions.get(request.session_id)
        if existing is not None:
            if existing.epoch == request.epoch:
                return info  # a retried open
            if existing.epoch > request.epoch:
                raise FailedPrecondition(
                    f"session {request.session_id} is here at epoch {existing.epoch}, "
                    f"newer than {request.epoch}"
                )
            # placed back here after it moved away: what this actor holds is stale
            self.engine.drop(
                request.session_id,
                Unavailable(
                    f"session {request.session_id} was placed again (epoch {request.epoch})"
                ),
            )
        if self.occupied >= self.config.capacity:
            self._metrics.admission_refusals.add(1, {"reason": "full"})
            raise ResourceExhausted(
                f"worker {self.config.worker_id} is full ({self.config.capacity} sessions)",
                retry_after_s=1.0,
            )
        spec = resolve_spec(request.spec, info)
        # A recovered session was admitted once already: it is taken by slots alone and the
        # quality governor steps it down if the worker cannot keep its fps.
        recovery = request.recovery or request.restore_latest
        if self.config.fps_admission and not recovery:
            try:
                admission.check(
                    self.engine,
                    spec,
                    info,
                    self.config.target_utilization,
                    self.config.admission_retry_after_s,
                    self.config.worker_id,
                )
            except ResourceExhausted:
                self._metrics.admission_refusals.add(1, {"reason": "fps"})
                raise
        self._opening += 1
        try:
            for attempt in range(1, CLAIM_ATTEMPTS + 1):
                actor, entries = await self._open_actor(request, model, spec)
                try:
                    if self.journal is not None and (entries or recovery):
                        await self.journal.claim(actor, entries)
                        await self.journal.sync_logged(actor, entries)
                    break
                except Fenced:
                    # its previous owner appended between our read and our CLAIM
                    if attempt == CLAIM_ATTEMPTS:
                        raise
                    log.warning(
                        "session %s: the log moved on while it was restored; again",
                        request.session_id,
                    )
        finally:
            self._opening -= 1
        # a recovered session had its chance to attach: reclaiming parks it, never closes it
        actor.ever_attached = recovery
        self.engine.add(actor)
        log.info(
            "opened session %s at frame %d (%s, %.1f fps, %d steps)",
            request.session_id,
            actor.next_frame,
            spec.model_id,
            spec.fps,
            spec.steps,
            extra={"session_id": request.session_id},
        )
        self._on_change()
        return info

    async def _open_actor(
        self, request: internal_pb2.OpenSessionRequest, model: WorldModel, spec: pb.SessionSpec
    ) -> tuple[SessionActor, list[StoredEntry]]:
        """A new actor for ``request``: fresh from its seed, or restored (at
        ``restore_to``, or at its log's head for a recovery with no client); and the log
        as read, for its CLAIM."""
        entries: list[StoredEntry] = []
        if request.restore or request.restore_latest:
            memory = await self._memory_of(request.source_session_id, request.restore_to)
            restored = await self.durable().restore(
                request.session_id,
                model,
                spec.seed,
                spec.steps,
                self.engine.in_step_thread,
                to_frame=None if request.restore_latest else request.restore_to,
                memory=memory,
            )
            state, entries = restored.state, restored.entries
        else:
            # in the step thread: a model host answers between batches
            state = await self.engine.in_step_thread(lambda: model.new_state(spec.seed))
        return self.new_actor(request.session_id, spec, model, state, request.epoch), entries

    def new_actor(
        self,
        session_id: str,
        spec: pb.SessionSpec,
        model: WorldModel,
        state: SessionState,
        epoch: int,
    ) -> SessionActor:
        return SessionActor(
            session_id,
            spec,
            model,
            state,
            epoch=epoch,
            window=self.config.window,
            out_queue=self.config.out_queue,
            max_pending_controls=self.config.max_pending_controls,
            now=time.monotonic(),
            meter=UsageMeter(session_id, spec.model_id, spec.fps, self.config.worker_id),
        )

    def bill(self, records: list[internal_pb2.UsageRecord]) -> None:
        if self.usage is not None:
            self.usage.submit(records)
        for record in records:
            self._metrics.usage_seconds.add(
                (record.end_frame - record.first_frame) / max(1, record.frames_per_second),
                self._model_attrs.get(record.model_id) or {"model": record.model_id},
            )

    async def _memory_of(self, source_id: str, frame: int) -> dict[int, SessionState]:
        """In-memory snapshots of a session on this worker usable to restore ``frame``;
        a copy of its live state when the source sits exactly at ``frame``."""
        source = self.engine.sessions.get(source_id) if source_id else None
        if source is None:
            return {}
        memory = {f: kept for f, kept in source.recent.items() if f <= frame}
        if source.next_frame == frame and frame not in memory:
            await self.hold(source)
            try:
                if source.next_frame == frame:
                    state = source.state
                    memory[frame] = await self.engine.in_step_thread(
                        lambda: source.model.copy(state)
                    )
            finally:
                source.restoring = False
                self.engine.wake()
        return memory

    def status(self, session_id: str) -> internal_pb2.SessionStatus:
        actor = self.actor(session_id)
        return internal_pb2.SessionStatus(
            session_id=session_id,
            head_frame=actor.durable_head,
            dropped=actor.dropped,
            attached=actor.attached,
            steps=actor.steps,
            fps=1.0 / actor.interval,
            deadline_misses=self.engine.quality.misses(session_id),
            epoch=actor.epoch,
            ever_attached=actor.ever_attached,
            idle_s=actor.idle_s(time.monotonic()),
            level=self.engine.quality.level(session_id)[0],
        )

    def statuses(self) -> list[internal_pb2.SessionStatus]:
        return [self.status(session_id) for session_id in list(self.engine.sessions)]

    def close_session(
        self, session_id: str, *, if_idle_s: float = 0.0, epoch: int = 0
    ) -> internal_pb2.SessionStatus:
        """Close ``session_id``; with ``if_idle_s``, only if no client ever attached to it
        and it has waited that long (the reclaimer's close), else FAILED_PRECONDITION."""
        if if_idle_s > 0:
            self.reclaiming.check_unattached(self.actor(session_id), epoch, if_idle_s)
        status = self.status(session_id)
        actor = self.engine.remove(session_id)
        if actor is not None:
            actor.push(event(pb.SessionEvent.KIND_CLOSED, "session closed", actor.next_frame))
        self._on_change()
        log.info("closed session %s", session_id, extra={"session_id": session_id})
        return status

    # ---- the stream ----

    async def attach(
        self,
        requests: AsyncIterator[pb.ClientMessage],
        metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> AsyncIterator[pb.ServerMessage]:
        """One client stream of a session, as its controller or as a spectator
        (``services/worker/viewers.py``); a Handover moves it from one role to the other."""
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream closed before its Attach message") from None
        if not first.HasField("attach"):
            raise InvalidArgument("the first message on a stream must be Attach")
        session_id = first.attach.session_id
        actor = self.actor(session_id)
        if actor.parking:
            raise Unavailable(f"session {session_id} is being parked; it resumes once parked")
        if first.attach.window > 64:
            raise InvalidArgument(f"window {first.attach.window} is outside 1..64")
        given = dict(metadata)
        budget = given.get(names.METADATA_BUDGET_FRAMES)
        viewer = Viewer(
            new_viewer_id(),
            pb.ROLE_SPECTATOR if first.attach.role == pb.ROLE_SPECTATOR else pb.ROLE_CONTROLLER,
            window=first.attach.window,
            tenant=str(given.get(names.METADATA_TENANT, "")),
            token_id=str(given.get(names.METADATA_TOKEN_ID, "")),
            budget_frames=None if budget is None else max(0, int(budget)),
        )
        if viewer.spectating:
            if first.attach.controls:
                raise PermissionDenied("a spectator sends no controls (Attach.controls)")
            if first.attach.resume:
                raise InvalidArgument(
                    "a spectator cannot resume (Attach.resume): it sees the session's frames "
                    "as they are made"
                )
        refused: list[tuple[pb.Control, WindflowError]] = []
        attach_controls = list(first.attach.controls)
        if actor.awaiting_commit:
            # migrated here, the placement moved, the claim not done yet: a gateway that
            # switched legs at once waits for it (the commit's own deadline bounds this)
            await asyncio.wait_for(self.migrations.settle(actor), timeout=COMMIT_WAIT_S)
            if self.engine.sessions.get(session_id) is not actor:
                raise actor.lost or Unavailable(
                    f"session {session_id}'s migration to {self.config.worker_id} was aborted"
                )
        if not viewer.spectating:
            if actor.controller and not first.attach.resume:
                await self._controller_gone(actor)
            if first.attach.resume:
                await self._bring_to(actor, first.attach.resume_from)
                if self.engine.sessions.get(session_id) is not actor:
                    # dropped or replaced while it was brought to the frame (moved away,
                    # closed): the gateway follows it (a chaos run saw a KeyError here)
                    raise actor.lost or Unavailable(
                        f"session {session_id} left worker {self.config.worker_id} while resuming"
                    )
                refused = actor.resume_controls(attach_controls)
            else:
                actor.add_controls(attach_controls)  # all or none: refused, no attach
        actor.viewers[viewer.viewer_id] = viewer
        if not viewer.spectating:
            # (a resume takes the role over from a stream still attached: its client again)
            self._take_control(actor, viewer)
        reader = asyncio.create_task(
            self._read_client(actor, viewer, requests), name=f"client-reader:{session_id}"
        )
        span = tracer.start_span(
            names.SPAN_WORKER_SESSION,
            context=telemetry.extract_metadata(metadata),
            attributes={
                "windflow.session_id": session_id,
                "windflow.worker": self.config.worker_id,
                "windflow.role": pb.Role.Name(viewer.role),
            },
        )
        if not viewer.spectating:
            actor.trace_context = trace.set_span_in_context(span)
        try:
            attached = event(
                pb.SessionEvent.KIND_ATTACHED,
                f"attached on worker {self.config.worker_id} (region {self.config.region})"
                + (" as a spectator" if viewer.spectating else ""),
                actor.next_frame,
                actor.steps,
            )
            attached.event.fps = 1.0 / actor.interval
            attached.event.level = self.engine.quality.level(session_id)[0]
            attached.event.viewer_id = viewer.viewer_id
            attached.event.role = viewer.role
            attached.event.spectators = len(actor.spectators)
            yield attached
            refused_ids = {id(control) for control, _ in refused}
            for control in attach_controls:  # (taken with the attach, or refused)
                if not viewer.spectating and id(control) not in refused_ids:
                    yield receipt(control)  # (here, before any frame)
            for control, err in refused:
                yield stream_error(err, control.frame_index, control)
            while True:
                if viewer.spectating:
                    async for message in self._spectate(actor, viewer, reader):
                        yield message
                    if viewer.spectating or actor.controller != viewer.viewer_id:
                        return  # the session ended, or the stream did
                else:
                    async for message in self._control(actor, viewer, reader):
                        yield message
                    if not viewer.spectating:
                        return  # ended, or another stream of its client took it over
        finally:
            span.end()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if actor.viewers.get(viewer.viewer_id) is viewer:
                del actor.viewers[viewer.viewer_id]
            if actor.controller == viewer.viewer_id:
                self._release_control(actor)
            elif viewer.spectating and actor.viewers and not actor.closed:
                actor.announce_roles(f"spectator {viewer.viewer_id} left")

    def _frame_sent(self, model_id: str, frame: pb.Frame) -> None:
        """A frame sent to its session's controller, into the metrics: a count, and when
        live its latency from its due time (and from its control's arrival, for the first
        frame a control applies to): ~10 us with the OpenTelemetry SDK."""
        self.delivered[model_id] += 1
        if not self._metrics.live:
            return
        attrs = self._model_attrs.get(model_id) or {"model": model_id}
        ts = frame.timestamps
        sent = ts.worker_sent_us
        self._metrics.frame_latency_ms.record(max(0.0, (sent - ts.due_us) / 1000.0), attrs)
        if ts.control_received_us:
            ms = max(0.0, (sent - ts.control_received_us) / 1000.0)
            self._metrics.control_to_frame_ms.record(ms, attrs)

    async def _controller_gone(self, actor: SessionActor) -> None:
        """A second controller's attach: wait a moment for the one attached to leave (its
        stream may be ending as this one starts), else FAILED_PRECONDITION."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(actor.wait_uncontrolled(), CONTROLLER_WAIT_S)
        if actor.controller:
            raise FailedPrecondition(
                f"session {actor.session_id} already has a controller (viewer "
                f"{actor.controller}); attach as a spectator (Attach.role = ROLE_SPECTATOR) "
                "and ask it for a Handover, or resume your own stream (Attach.resume)"
            )

    def _take_control(self, actor: SessionActor, viewer: Viewer) -> None:
        """Make ``viewer`` the session's controller: its acks pace the session, its token
        is billed for its frames and caps them (a stream still controlling loses the role
        to it and ends: a resume)."""
        actor.controller = viewer.viewer_id
        viewer.role = pb.ROLE_CONTROLLER
        self.bill(actor.meter.flush())  # (the frames of the stream it takes over from)
        actor.meter.attached(viewer.tenant, viewer.token_id)
        actor.attach(viewer.window)
        actor.out.clear()  # (the previous controller's: the new one saw them as a spectator)
        actor.budget_stop = (
            None if viewer.budget_frames is None else actor.next_frame + viewer.budget_frames
        )
        actor.due = max(actor.due, time.monotonic())
        viewer.wake.set()  # (a spectator's stream, waiting as one)
        actor.frame_available.set()  # (the previous controller's)
        self.engine.wake()

    def _release_control(self, actor: SessionActor) -> None:
        """The controller's stream ended: the session stops being made, and its head is
        recorded once its last frames are settled; its spectators are told."""
        actor.controller = ""
        self.bill(actor.meter.flush())
        actor.detach(time.monotonic())
        if self.journal is not None and not actor.closed:
            task = asyncio.create_task(self._mark_head(actor), name=f"mark-head:{actor.session_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if actor.viewers and not actor.closed:
            actor.announce_roles("the controller left")

    def handover(self, actor: SessionActor, viewer: Viewer, to: str) -> None:
        """A Handover from ``viewer``: to the spectator ``to`` (from the controller), or to
        itself (a spectator, while no controller is attached)."""
        if not viewer.spectating:
            target = actor.viewers.get(to)
            if target is None or not target.spectating:
                raise NotFound(
                    f"no spectator {to!r} is attached to session {actor.session_id} here"
                )
            self._take_control(actor, target)
            viewer.role = pb.ROLE_SPECTATOR
            actor.announce_roles(f"{viewer.viewer_id} handed control to {to}")
            return
        if to not in ("", viewer.viewer_id):
            raise PermissionDenied("only the controller hands the controller role to another")
        if actor.controller:
            raise FailedPrecondition(
                f"session {actor.session_id} has a controller (viewer {actor.controller}): "
                "it hands the role over"
            )
        self._take_control(actor, viewer)
        actor.announce_roles(f"{viewer.viewer_id} took control")

    async def _control(
        self, actor: SessionActor, viewer: Viewer, reader: asyncio.Task[None]
    ) -> AsyncIterator[pb.ServerMessage]:
        """The controller's frames, under its flow-control window, while it holds the role
        (it ends at a handover, a take-over, or the session's end)."""
        while actor.controller == viewer.viewer_id:
            while actor.can_send() and actor.controller == viewer.viewer_id:
                held = not actor.ready
                message = actor.pop()
                if held and actor.ready:
                    # A PAUSE session whose queue was full may go on. Its reader held it
                    # back, not the worker: its deadlines start again from now (the frames
                    # it could not make meanwhile are no deadline misses for the quality
                    # governor). And nothing else wakes a step loop that found no session
                    # ready.
                    actor.due = max(actor.due, time.monotonic())
                    self.engine.wake()
                if message.HasField("frame"):
                    _stamp_sent(message.frame)
                    self.bill(actor.meter.add(message.frame, actor.epoch))
                    self._frame_sent(actor.spec.model_id, message.frame)
                yield message
            if actor.closed and not actor.out:
                if actor.lost is not None:
                    raise actor.lost  # not a close: the gateway recovers the session
                return
            stop = actor.budget_stop
            if stop is not None and actor.last_sent >= stop - 1 and not actor.out:
                yield await self.reclaiming.budget_spent(actor, stop)
                raise ResourceExhausted(
                    f"the token's streaming budget ends at frame {stop}; attach with a "
                    f"new token and resume_from={stop} to go on"
                )
            if self._stream_over(reader):
                return
            actor.frame_available.clear()
            if actor.can_send() or (actor.closed and not actor.out):
                continue
            if actor.controller != viewer.viewer_id:
                return
            await actor.frame_available.wait()

    async def _spectate(
        self, actor: SessionActor, viewer: Viewer, reader: asyncio.Task[None]
    ) -> AsyncIterator[pb.ServerMessage]:
        """A spectator's frames and events as the session makes them, newest first when it
        reads slowly, while it spectates (it ends when it takes control or the session
        ends)."""
        viewer.start_at(actor.next_frame, viewer.window or SPECTATOR_WINDOW)
        while viewer.spectating:
            while (message := viewer.take()) is not None:
                if message.HasField("frame"):
                    _stamp_sent(message.frame)
                yield message
                if not viewer.spectating:
                    return
            if actor.closed:
                if actor.lost is not None:
                    raise actor.lost
                return
            if self._stream_over(reader):
                return
            viewer.wake.clear()
            if viewer.can_send() or actor.closed or not viewer.spectating:
                continue
            await viewer.wake.wait()

    def _stream_over(self, reader: asyncio.Task[None]) -> bool:
        """Has the client's side failed (its messages could not be read)? A worker that
        drains ends the stream UNAVAILABLE instead (the gateway moves the session). A
        client that only closed its side still gets its frames."""
        if self._draining:
            raise Unavailable(
                f"worker {self.config.worker_id} is shutting down; the session "
                "continues on another worker"
            )
        return reader.done() and not reader.cancelled() and reader.exception() is not None

    async def _mark_head(self, actor: SessionActor) -> None:
        """Once a detached session's last frames are settled, record its head in its log
        (where a re-placement with no client brings it back)."""
        try:
            await actor.wait_idle()
            if actor.attached or actor.closed or actor.restoring:
                return  # attached again: its own frames and entries go on from here
            await self.durable().mark_head(actor)
        except WindflowError as err:
            log.warning("session %s: its head was not recorded: %s", actor.session_id, err)

    def release(self, actor: SessionActor) -> None:
        """Give a held ``actor`` back to the step loop."""
        actor.restoring = False
        self.engine.wake()

    async def hold(self, actor: SessionActor) -> None:
        """Take ``actor`` out of the step loop; wait for its step in flight, if any, and
        for its log appends in flight (a late append would log a future about to go)."""
        actor.restoring = True
        await actor.wait_idle()
        async with actor.log_lock:  # FIFO: every append queued before this one is done
            pass

    async def _bring_to(self, actor: SessionActor, frame: int) -> None:
        """Make ``frame`` the actor's next frame: replay forward, or go back to it as a
        rewind does (frames from ``frame`` on were made but never delivered: that future
        leaves the log, and the resumed client's controls make it again)."""
        if frame == actor.next_frame:
            return
        journal = self.durable()
        await self.hold(actor)
        try:
            if frame > actor.next_frame:
                entries = await journal.log.read(actor.session_id)
                controls = controls_by_frame(entries)
                state = actor.state
                await journal.replay(
                    actor.model,
                    state,
                    controls,
                    frame,
                    actor.spec.steps,
                    self.engine.in_step_thread,
                )
                actor.reset_to(state)
                await journal.sync_logged(actor, entries)
                actor.due = time.monotonic()
            else:
                await self._reset(actor, frame)
        finally:
            actor.restoring = False
            self.engine.wake()

    async def _reset(self, actor: SessionActor, frame: int) -> None:
        """Continue a held ``actor`` from ``frame`` (< its head): its log entries and
        checkpoints after it go, its state is restored there, and a HEAD entry records
        the new head."""
        journal = self.durable()
        session_id = actor.session_id
        await actor.wait_uploaded()  # a checkpoint past `frame` must land before the prune
        stored = await journal.log.read(session_id)
        await journal.log.truncate(session_id, stored, frame)
        await journal.drop_checkpoints_after(session_id, frame)
        if journal.heads is not None:
            await journal.heads.cap(session_id, frame)
        restored = await journal.restore(
            session_id,
            actor.model,
            actor.spec.seed,
            actor.spec.steps,
            self.engine.in_step_thread,
            to_frame=frame,
            memory=dict(actor.recent),
        )
        actor.reset_to(restored.state)
        actor.log_seq = max((e.seq for e in restored.entries), default=0)
        await journal.sync_logged(actor, restored.entries)
        await journal.mark_head(actor)
        actor.due = time.monotonic()

    async def rewind(self, session_id: str, frame: int) -> internal_pb2.SessionStatus:
        """Continue ``session_id`` from ``frame``: later log entries and checkpoints go."""
        actor = self.actor(session_id)
        if frame > actor.next_frame:
            raise OutOfRange(
                f"cannot rewind {session_id} to frame {frame}: its head is {actor.next_frame}"
            )
        await self.hold(actor)
        try:
            await self._reset(actor, frame)
            actor.push(
                event(pb.SessionEvent.KIND_REWOUND, f"rewound to frame {frame}", frame, actor.steps)
            )
        finally:
            actor.restoring = False
            self.engine.wake()
        log.info("rewound session %s to frame %d", session_id, frame)
        return self.status(session_id)

    async def replay(self, request: internal_pb2.WorkerReplayRequest) -> AsyncIterator[pb.Frame]:
        """Frames [from, to) of a session, re-rendered from its checkpoints and log."""
        if request.to_frame < request.from_frame:
            raise OutOfRange(f"empty replay range [{request.from_frame}, {request.to_frame})")
        actor = self.engine.sessions.get(request.session_id)
        if actor is not None and request.to_frame > actor.next_frame:
            raise OutOfRange(
                f"replay up to {request.to_frame} is beyond the head ({actor.next_frame})"
            )
        model = self.models.get(request.spec.model_id)
        if model is None:
            raise NotFound(f"model {request.spec.model_id!r} is not loaded here")
        spec = resolve_spec(request.spec, model_info_to_proto(model.info))
        restored = await self.durable().restore(
            request.session_id,
            model,
            spec.seed,
            spec.steps,
            self.engine.in_step_thread,
            to_frame=request.from_frame,
        )
        controls = controls_by_frame(restored.entries)
        inputs = await self.durable().load_inputs(controls, request.from_frame)
        state = restored.state
        chunk = 8
        for start in range(request.from_frame, request.to_frame, chunk):
            stop = min(start + chunk, request.to_frame)
            frames = await self.engine.in_step_thread(
                lambda stop=stop: _render(model, state, controls, stop, spec, inputs)  # type: ignore[misc]
            )
            for frame in frames:
                yield frame

    async def _read_client(
        self, actor: SessionActor, viewer: Viewer, requests: AsyncIterator[pb.ClientMessage]
    ) -> None:
        async for message in requests:
            await self._room_for(actor, viewer)
            kind = message.WhichOneof("msg")
            if kind == "control":
                if viewer.spectating:
                    self._metrics.controls_refused.add(1, {"code": "PERMISSION_DENIED"})
                    viewer.put(
                        stream_error(
                            PermissionDenied(
                                f"viewer {viewer.viewer_id} is a spectator: controls come "
                                f"from the controller ({actor.controller or 'none attached'})"
                            ),
                            message.control.frame_index,
                            message.control,
                        )
                    )
                    continue
                try:
                    actor.add_control(message.control)
                except WindflowError as err:
                    self._metrics.controls_refused.add(1, {"code": err.code})
                    actor.push(stream_error(err, message.control.frame_index, message.control))
                else:
                    actor.confirm(message.control)
                    self.engine.wake()  # its frame may now start early (scheduler.start_due)
            elif kind == "ack":
                if actor.controller == viewer.viewer_id:
                    actor.ack(message.ack.frame_index)
                elif viewer.spectating:
                    viewer.ack(message.ack.frame_index)
            elif kind == "handover":
                try:
                    self.handover(actor, viewer, message.handover.viewer_id)
                except WindflowError as err:
                    self._tell(actor, viewer, stream_error(err, actor.next_frame))
            else:
                bad = InvalidArgument(f"unexpected {kind or 'empty'} message after Attach")
                self._tell(actor, viewer, stream_error(bad, actor.next_frame))

    @staticmethod
    async def _room_for(actor: SessionActor, viewer: Viewer) -> None:
        """Wait while the queue this stream's answers go to is full (``OUT_MESSAGES_MAX``):
        the client's own messages then wait unread."""
        while not actor.closed:
            spectating = viewer.spectating
            queue, sent = (viewer.out, viewer.taken) if spectating else (actor.out, actor.sent)
            if len(queue) < OUT_MESSAGES_MAX:
                return
            sent.clear()
            with contextlib.suppress(TimeoutError):  # (a queue cleared by a role change)
                await asyncio.wait_for(sent.wait(), 0.1)

    @staticmethod
    def _tell(actor: SessionActor, viewer: Viewer, message: pb.ServerMessage) -> None:
        """An in-stream message for ``viewer`` alone."""
        if viewer.spectating:
            viewer.put(message)
        else:
            actor.push(message)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Before a graceful stop: make no more frames, deliver those made (within
        ``timeout_s``), then end every attached stream with UNAVAILABLE, so that the gateway
        moves each session to another worker and resumes it where its client is, as after a
        crash. (Ending the streams normally, or letting the server cancel them, would end
        the clients' streams: a rolling restart would lose every session.) New sessions
        are refused from the start. The worker's registration goes after this, which moves
        its sessions with no stream attached."""
        self._draining = True
        self._on_change()  # no free slot any more: the router places nothing new here
        attached = [a for a in self.engine.sessions.values() if a.attached]
        log.info("draining: %d attached session(s) move to other workers", len(attached))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.engine.quiesce(), timeout_s)
        for actor in self.engine.sessions.values():
            actor.notify()

    def placed_here(self, record: internal_pb2.PlacementRecord | None, epoch: int) -> bool:
        """Does the placement ``record`` name this worker at ``epoch``?"""
        return record is not None and (record.worker_id, record.epoch) == (
            self.config.worker_id,
            epoch,
        )

    async def check_placements(
        self, placement_of: Callable[[str], Awaitable[internal_pb2.PlacementRecord | None]]
    ) -> int:
        """Drop every session not placed here at its epoch any more (``placement_of``: its
        record, None when it has none): moved away or closed while this worker could not
        hear of it. An attached stream ends UNAVAILABLE, so that its gateway follows the
        session. Returns how many went."""
        dropped = 0
        for session_id, actor in list(self.engine.sessions.items()):
            record = await placement_of(session_id)
            if self.engine.sessions.get(session_id) is not actor or actor.awaiting_commit:
                continue  # replaced or closed meanwhile; or migrating here, not yet placed
            if self.placed_here(record, actor.epoch):
                continue
            where = (
                "it was closed"
                if record is None
                else f"it is placed on {record.worker_id} at epoch {record.epoch}"
            )
            self.engine.drop(
                session_id,
                Unavailable(
                    f"session {session_id} is not on worker {self.config.worker_id}: {where}"
                ),
            )
            dropped += 1
        if dropped:
            self._on_change()
        return dropped

    async def aclose(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.migrations.aclose()
        for session_id in list(self.engine.sessions):
            self.engine.remove(session_id)
        if self.journal is not None and isinstance(self.journal.replayer, BatchedReplay):
            await self.journal.replayer.aclose()
        await self.engine.aclose()
        if self.journal is not None:
            await self.journal.aclose()


def _stamp_sent(frame: pb.Frame) -> None:
    """The frame leaves the worker now."""
    sent = telemetry.now_us()
    frame.timestamps.worker_sent_us = sent
    frame.latency.send_ms = (sent - frame.timestamps.encoded_us) / 1000.0


def _render(
    model: WorldModel,
    state: SessionState,
    controls: list[internal_pb2.LogEntry],
    stop: int,
    spec: pb.SessionSpec,
    inputs: Inputs,
) -> list[pb.Frame]:
    """Step ``state`` up to ``stop`` under the logged controls, encoding every frame."""
    out: list[pb.Frame] = []

    def keep(index: int, rgb: object) -> None:
        entry = applied_at(controls, index)
        data = encode_frame(rgb, spec.format, spec.width, spec.height, spec.jpeg_quality)  # type: ignore[arg-type]
        out.append(
            pb.Frame(
                frame_index=index,
                format=spec.format,
                width=spec.width,
                height=spec.height,
                data=data,
                steps=entry.steps if entry and entry.steps else spec.steps,
                action=entry.action if entry else 0,
            )
        )

    replay_steps(model, state, controls, stop, spec.steps, keep, inputs)
    return out
