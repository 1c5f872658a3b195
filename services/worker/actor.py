"""One session actor per session: its model state, its controls and its outbound frames.

The actor lives on the worker's event loop. Its model state is touched only by the model
(the step thread, or the model's host process), and only while the step loop has batches
of it in flight (``stepping``; up to ``pipeline`` of them, one after the other). Queues:
- pending controls: bounded (``max_pending_controls``); a control over the bound is
  refused with RESOURCE_EXHAUSTED, never dropped;
- outbound frames: bounded (``out_queue``); on overflow DROP_OLDEST drops the oldest
  unsent frame and counts it, PAUSE holds generation until the client catches up;
- flow control: at most ``window`` frames are in flight unacknowledged by the client.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import logging
import time
from dataclasses import dataclass

from opentelemetry import context as otel_context

from services.worker import controls
from services.worker.messages import receipt
from services.worker.models.base import Control, SessionState, WorldModel
from services.worker.viewers import Viewer, role_event
from windflow.access.usage import UsageMeter
from windflow.common import telemetry
from windflow.errors import InvalidArgument, ResourceExhausted, WindflowError
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)


OUT_MESSAGES_MAX = 1024
"""Messages (frames, events, receipts, in-stream errors) queued for a stream at most before
its client's messages are read again: its sends then wait (gRPC flow control), so a client
that floods a stream and never reads costs a bounded queue."""


@dataclass(slots=True)
class AppliedControl:
    control: Control
    client_time_us: int
    """client_time_us of the control newly applied at this frame, else 0."""
    received_us: int = 0
    """When this worker read that control (wall clock, us), else 0."""
    client_times: tuple[int, ...] = ()
    """client_time_us of every control taken for this frame, in order (``Frame.
    applied_client_time_us``)."""


class SessionActor:
    def __init__(
        self,
        session_id: str,
        spec: pb.SessionSpec,
        model: WorldModel,
        state: SessionState,
        *,
        epoch: int,
        window: int,
        out_queue: int,
        max_pending_controls: int,
        now: float,
        meter: UsageMeter | None = None,
    ) -> None:
        self.session_id = session_id
        self.spec = spec
        self.model = model
        self.state = state
        self.epoch = epoch
        self.interval = 1.0 / spec.fps
        self.lockstep = spec.session_class == pb.SESSION_CLASS_LOCKSTEP
        """No clock: a frame as soon as its control is in (``services/worker/scheduler.py``);
        ``due`` is then when it last became ready, not a deadline."""
        self.due = now
        self.steps = spec.steps
        self._default_window = window
        self.window = window
        self._out_capacity = out_queue
        self._max_pending = max_pending_controls
        # controls stamped for future frames, sorted by frame index
        self._pending_idx: list[int] = []
        self._pending: list[tuple[Control, int, int]] = []
        """Waiting controls in frame order: (control, client time, received time)."""
        self.current = Control()
        """The controls in effect (each sticky until a later one changes it)."""
        self.input_dropped = 0
        """Input frames dropped (newest wins): more came than the model used."""
        self.logged: tuple[object, ...] | None = None
        """What the newest control-log entry records (``journal.logged_key``); None
        before the first."""
        self.log_seq = 0
        """Stream sequence of the session's newest log entry (the append fence)."""
        self.log_lock = asyncio.Lock()
        """Held by an append in flight: appends of one session go one at a time, in order."""
        self._no_upload = asyncio.Event()
        self._no_upload.set()
        self.recent: collections.OrderedDict[int, SessionState] = collections.OrderedDict()
        """In-memory snapshots by frame, newest last (fast forks and rewinds on this
        worker): copies of the state (``WorldModel.copy``) where the model runs."""
        self.durable_head = state.frame_index
        """Frames made whose control-log entries the server acknowledged."""
        self.restoring = False
        """Held out of the step loop while its state is replaced (rewind, resume)."""
        self.out: collections.deque[pb.ServerMessage] = collections.deque()
        self.frame_available = asyncio.Event()
        self.sent = asyncio.Event()
        """Set whenever a message leaves ``out`` for the stream (``pop``)."""
        self.dropped = 0
        self.last_sent = state.frame_index - 1
        self.last_acked = state.frame_index - 1
        self.attached = False
        """A controller's stream is attached (the session is made only while one is)."""
        self.viewers: dict[str, Viewer] = {}
        """The streams attached to it here, controller and spectators, by viewer id."""
        self._controller = ""
        self._uncontrolled = asyncio.Event()
        self._uncontrolled.set()
        self.ever_attached = False
        """A client stream attached to it here (or on a worker before: a recovery or a
        migration sets it): what tells a session abandoned before its first attach (closed
        by the reclaimer) from a detached one (parked)."""
        self.idle_since = now
        """When (monotonic) it was opened here or its stream last detached."""
        self.meter = meter or UsageMeter(session_id, spec.model_id, spec.fps, "")
        """Its frames sent, second by second, for billing (windflow/access/usage.py)."""
        self.budget_stop: int | None = None
        """The attached stream's token may not have this frame or later made (its
        streaming budget ends there); None: no cap."""
        self.parking = False
        """Being checkpointed to be let go (``WorkerRuntime.park``): attaches are refused."""
        self.trace_context: otel_context.Context | None = None
        """Trace context of the attached stream's session span (parent of frame spans)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.head = state.frame_index
        """The next frame to launch: frames in flight are counted (``begin_step``)."""
        self.inflight = 0
        """Batches with a frame of this session launched and not yet finished."""
        self.pipeline = 1
        """How many may be in flight at once (2 where the model's host queues a batch
        behind the one it runs: ``StepEngine``)."""
        self.closed = False
        self.lost: WindflowError | None = None
        """Why this worker dropped the session without a client closing it (fenced by a new
        owner, a failed step): its stream ends with this error (UNAVAILABLE), so that the
        gateway recovers the session where it lives now, instead of ending the client's
        stream as if the session were closed."""
        self.unreleased = 0
        """Frames stepped whose release (log ack, send) is still under way."""
        self.generation = 0
        """Bumped when the state is replaced (rewind, resume): frames stepped before are
        of another future and are not sent."""
        self.stop_at: int | None = None
        """Migrating away: no frame from this one on is made here (``Migrations.stop``)."""
        self._committed = asyncio.Event()
        self._committed.set()

    # ---- live migration ----

    @property
    def awaiting_commit(self) -> bool:
        """Migrated here and caught up, held until the placement moves here (COMMIT)."""
        return not self._committed.is_set()

    @awaiting_commit.setter
    def awaiting_commit(self, value: bool) -> None:
        if value:
            self._committed.clear()
        else:
            self._committed.set()

    async def wait_committed(self) -> None:
        await self._committed.wait()

    # ---- the step loop's hold on the state ----

    @property
    def stepping(self) -> bool:
        """In a batch in flight (its state belongs to the model until it finishes)."""
        return self.inflight > 0

    def begin_step(self) -> None:
        """A batch with this session's next frame is launched (after its control is
        taken): the next frame to launch is the one after."""
        self.inflight += 1
        self.head += 1
        self._idle.clear()

    def end_step(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def checkpoint_busy(self) -> bool:
        """A checkpoint upload of this session is in flight."""
        return not self._no_upload.is_set()

    @checkpoint_busy.setter
    def checkpoint_busy(self, value: bool) -> None:
        if value:
            self._no_upload.clear()
        else:
            self._no_upload.set()

    async def wait_uploaded(self) -> None:
        await self._no_upload.wait()

    # ---- controls ----

    @property
    def next_frame(self) -> int:
        """The frame the next launched batch makes (frames in flight included)."""
        return self.head

    def add_controls(self, msgs: list[pb.Control]) -> None:
        """Queue all of ``msgs`` or, if any is refused, none of them."""
        checked = [self._check(msg) for msg in msgs]
        if len(self._pending) + len(msgs) > self._max_pending:
            raise ResourceExhausted(f"more than {self._max_pending} controls at once")
        for msg, control in zip(msgs, checked, strict=True):
            self._queue(msg, control)

    def resume_controls(self, msgs: list[pb.Control]) -> list[tuple[pb.Control, WindflowError]]:
        """Queue the controls a resumed stream re-sends (accepted before, by this worker
        or the session's previous one, for frames its client has not seen yet), each on
        its own: one refused now does not take the others with it. They were within the
        pending bound once and the gateway bounds how many it keeps, so the bound is not
        applied again (frames made meanwhile turned pending controls into re-sent ones).
        Returns the refused ones with why."""
        refused = []
        for msg in msgs:
            try:
                control = self._check(msg)
            except WindflowError as err:
                refused.append((msg, err))
                continue
            self._queue(msg, control)
        return refused

    def add_control(self, msg: pb.Control) -> None:
        """Queue a control for its frame; InvalidArgument/ResourceExhausted if refused."""
        control = self._check(msg)
        if len(self._pending) >= self._max_pending:
            raise ResourceExhausted(
                f"{self._max_pending} controls are already waiting for future frames",
                retry_after_s=self.interval,
            )
        self._queue(msg, control)

    def _queue(self, msg: pb.Control, control: Control) -> None:
        if control.frame is not None:
            self._bound_inputs()
        pos = bisect.bisect_right(self._pending_idx, msg.frame_index)
        self._pending_idx.insert(pos, msg.frame_index)
        self._pending.insert(pos, (control, msg.client_time_us, telemetry.now_us()))

    def _bound_inputs(self) -> None:
        """Make room for one more waiting input frame: past the model's queue the oldest
        waiting one goes (newest wins), counted; its control's other kinds stay."""
        spec = self.model.info.input_frame
        limit = max(1, spec.queue if spec is not None else 1)
        waiting = [i for i, (c, _, _) in enumerate(self._pending) if c.frame is not None]
        for i in waiting[: max(0, len(waiting) - limit + 1)]:
            control, client_time, received = self._pending[i]
            self._pending[i] = (dataclasses.replace(control, frame=None), client_time, received)
            self.input_dropped += 1

    def _check(self, msg: pb.Control) -> Control:
        if msg.frame_index < self.next_frame:
            raise InvalidArgument(
                f"control for frame {msg.frame_index} is in the past: the next frame to be "
                f"generated is {self.next_frame}"
            )
        return controls.from_message(msg, self.model)

    @property
    def pending_controls(self) -> int:
        """Controls queued for future frames (the metrics' ``controls_pending``)."""
        return len(self._pending_idx)

    @property
    def control_waiting(self) -> bool:
        """Has a control stamped for the next frame (or earlier) arrived, not yet applied?"""
        return bool(self._pending_idx) and self._pending_idx[0] <= self.next_frame

    @property
    def expecting_control(self) -> bool:
        """A lockstep session idle until its next control comes (what a batch being
        gathered waits a moment for)."""
        return (
            self.lockstep
            and self.attached
            and not self.closed
            and self.inflight == 0
            and not self.control_waiting
        )

    @property
    def control_arrived(self) -> float:
        """When (monotonic) the first waiting control arrived (a lockstep session's place
        in line); its due when none waits."""
        if not self._pending:
            return self.due
        age_s = max(0, telemetry.now_us() - self._pending[0][2]) / 1e6
        return time.monotonic() - age_s

    def take_control(self) -> AppliedControl:
        """The control for the next frame: the latest one stamped at or before it."""
        applied_time = received = 0
        times: list[int] = []
        taken = 0
        while taken < len(self._pending) and self._pending_idx[taken] <= self.next_frame:
            taken += 1
        inputs = sum(1 for c, _, _ in self._pending[:taken] if c.frame is not None)
        if inputs > 1:  # the newest frame in applies; the ones before it are never used
            self.input_dropped += inputs - 1
        for control, applied_time, received in self._pending[:taken]:  # noqa: B007 (the last's)
            self.current = controls.merge(self.current, control)
            if applied_time:
                times.append(applied_time)
        del self._pending[:taken], self._pending_idx[:taken]
        return AppliedControl(self.current, applied_time, received, tuple(times))

    def confirm(self, msg: pb.Control) -> None:
        """Queue the receipt of an accepted control for the controller, ahead of the frames
        waiting to go out (a receipt is no frame: the window does not hold it)."""
        self.out.appendleft(receipt(msg))
        self.frame_available.set()

    # ---- flow control and output ----

    def attach(self, window: int) -> None:
        self.attached = True
        self.ever_attached = True
        self.window = window or self._default_window
        self.last_sent = self.last_acked = self.next_frame - 1

    def detach(self, now: float) -> None:
        self.attached = False
        self.budget_stop = None
        self.idle_since = now
        self.out.clear()

    def idle_s(self, now: float) -> float:
        """How long it has been without a client stream (0 while one is attached)."""
        return 0.0 if self.attached else max(0.0, now - self.idle_since)

    def ack(self, frame_index: int) -> None:
        if frame_index > self.last_acked:
            self.last_acked = min(frame_index, self.last_sent)
            self.frame_available.set()

    @property
    def ready(self) -> bool:
        """May the scheduler step this session now?"""
        if not self.attached or self.closed or self.restoring or self.awaiting_commit:
            return False
        if self.stop_at is not None and self.head >= self.stop_at:
            return False
        if self.budget_stop is not None and self.head >= self.budget_stop:
            return False
        if self.inflight >= self.pipeline:
            return False
        if self.lockstep and not self.control_waiting:
            return False  # its next frame waits for the control stamped for it
        owed = self.unreleased + self.inflight
        if self.spec.output_policy == pb.OUTPUT_POLICY_PAUSE:
            return len(self.out) + owed < self._out_capacity
        # frames still waiting for their control-log acks are bounded too: a slow log
        # server holds the session back rather than piling up stepped frames
        return owed < self._out_capacity

    def remember(self, frame: int, state: SessionState, keep: int) -> None:
        self.recent[frame] = state
        while len(self.recent) > keep:
            self.recent.popitem(last=False)

    def reset_to(self, state: SessionState) -> None:
        """Continue from ``state`` (a rewind or resume): queued output and controls go."""
        self.state = state
        self.head = state.frame_index
        self.generation += 1
        self.durable_head = state.frame_index
        for frame in [f for f in self.recent if f > state.frame_index]:
            del self.recent[frame]  # another future now
        self.out.clear()
        self._pending_idx.clear()
        self._pending.clear()
        self.last_sent = self.last_acked = state.frame_index - 1

    @property
    def controller(self) -> str:
        """The controller's viewer id ("" while none is attached)."""
        return self._controller

    @controller.setter
    def controller(self, viewer_id: str) -> None:
        self._controller = viewer_id
        if viewer_id:
            self._uncontrolled.clear()
        else:
            self._uncontrolled.set()

    async def wait_uncontrolled(self) -> None:
        await self._uncontrolled.wait()

    @property
    def spectators(self) -> list[Viewer]:
        return [v for v in self.viewers.values() if v.spectating]

    def notify(self) -> None:
        """Wake every stream of the session (it closed, moved, or its worker drains)."""
        self.frame_available.set()
        for viewer in self.viewers.values():
            viewer.wake.set()

    def announce_roles(self, why: str) -> None:
        """Tell every viewer who controls the session now, and its own role."""
        spectators = len(self.spectators)
        for viewer in self.viewers.values():
            message = role_event(viewer, self.controller, spectators, self.next_frame, why)
            if viewer.viewer_id == self.controller:
                self.out.append(message)
                self.frame_available.set()
            else:
                viewer.put(message)

    def push(self, message: pb.ServerMessage) -> None:
        """Queue an outbound message; frames over the bound follow the output policy.
        Frames and events go to every spectator as well (errors are the controller's)."""
        if not message.HasField("error"):
            for viewer in self.viewers.values():
                if viewer.spectating:
                    viewer.put(message)
        if message.HasField("frame"):
            frames = sum(1 for m in self.out if m.HasField("frame"))
            while frames >= self._out_capacity:
                for i, queued in enumerate(self.out):
                    if queued.HasField("frame"):
                        del self.out[i]
                        break
                frames -= 1
                self.dropped += 1
            message.frame.dropped_total = self.dropped
        self.out.append(message)
        self.frame_available.set()

    def can_send(self) -> bool:
        if not self.out:
            return False
        head = self.out[0]
        if not head.HasField("frame"):
            return True
        return self.last_sent - self.last_acked < self.window

    def pop(self) -> pb.ServerMessage:
        self.sent.set()
        message = self.out.popleft()
        if message.HasField("frame"):
            self.last_sent = message.frame.frame_index
        return message
