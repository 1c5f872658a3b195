"""The worker's step loop: runs the scheduler, steps batches off the event loop, encodes.

Lifecycle: construct -> ``start()`` -> ``add``/``remove`` sessions, ``wake()`` on changes
-> ``aclose()``. The model step and the frame encoding run in the model's host process
(``model_host``, the default), which the loop awaits directly, or for a model loaded in
this process in one dedicated thread; torch calls never run on the event loop, which only
plans batches and delivers frames.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from opentelemetry.trace import Span

from services.worker import scheduler
from services.worker.actor import AppliedControl, SessionActor
from services.worker.costs import StepCosts
from services.worker.journal import Journal
from services.worker.model_host import ModelHost, exit_worker
from services.worker.models.base import WorldModel
from services.worker.quality import QualityGovernor
from services.worker.stepping import Capture, Encoding, StepResult, step_and_encode, time_step
from windflow.common import names, telemetry
from windflow.common.durable import Fenced
from windflow.errors import ResourceExhausted, Unavailable, WindflowError
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)

WAKE_LEAD_S = 0.001
"""The loop plans this much ahead of the clock: the event loop's timers fire up to ~1 ms
late (epoll rounds its timeout up to whole milliseconds) and the hand-off to the step
thread takes a fraction of one, so a frame starts at its due time rather than ~1 ms after."""
HOST_LEAD_S = 0.001
"""More lead where a model runs in a model host: its batch is sent this much earlier and
the host starts it at its due time (``start_at_us``). Waking a model host that sat idle
between frames takes ~0.3 ms on this project's machine (docs/runtime.md, "Model hosts"):
sent at the due time, every frame would start that much late."""
HOST_PIPELINE = 2
"""Batches a model host may have at once (the default of ``pipeline_depth``): the one it
runs and the next, which the loop plans and sends while the first runs (when it is due by
the time the first ends), so the host starts it at once instead of after a round trip and
the loop's turn. Its controls are taken then, one batch earlier: this happens only when
batches run back to back."""
TIMING_REPEATS = 3
"""Timed runs of a batch when the worker measures its cost (``stepping.time_step`` keeps
the least): at start (``calibrate``) and while idle (``recheck_while_idle``)."""
RECHECK_TOLERANCE = 1.25
"""An idle worker's re-timed reference batch rescales its model's costs when it is off
the prediction by more than this factor, either way (``recheck_while_idle``); within it,
the difference is noise."""
FENCE_RETRY_S = 0.2
"""Past its lease, how soon a worker asks etcd again whether its sessions are still
placed on it, when etcd did not answer."""
tracer = telemetry.tracer(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class _Launched:
    """A batch sent to its model and not yet completed (``StepEngine._complete``)."""

    model_id: str
    steps: int
    model: WorldModel
    actors: list[SessionActor]
    controls: list[AppliedControl]
    indices: list[int]
    dues: list[float]
    appends: dict[int, asyncio.Task[None]]
    ready_us: int
    reply: asyncio.Future[StepResult]
    end: float
    """When it should be done (monotonic): its start plus its predicted cost."""
    depth: int
    """How many batches may be in flight with it (a model host: ``pipeline_depth``; else 1)."""
    span: Span
    wake: Callable[[], None]
    finished: float = 0.0
    """When its reply came (monotonic)."""

    def finish(self, _: object) -> None:
        self.finished = time.monotonic()
        self.wake()


@dataclass(slots=True)
class _Stepped:
    """A stepped batch whose frames are still to be sent (``StepEngine._release``)."""

    steps: int
    actors: list[SessionActor]
    generations: list[int]
    indices: list[int]
    dues: list[float]
    next_dues: list[float]
    controls: list[AppliedControl]
    appends: dict[int, asyncio.Task[None]]
    result: StepResult
    ready_us: int
    wall_offset_us: int
    stepped_us: int
    """When the loop took the result (wall clock, µs)."""


class StepEngine:
    def __init__(
        self,
        models: Mapping[str, WorldModel],
        *,
        horizon_s: float,
        step_threads: int,
        pipeline_depth: int = HOST_PIPELINE,
        memory_budget_bytes: int = 0,
        quality: scheduler.QualityParams | None = None,
        on_quality_change: Callable[[], None] = lambda: None,
        journal: Journal | None = None,
    ) -> None:
        self._models = dict(models)
        self.journal = journal
        self.max_batch = {
            mid: scheduler.effective_max_batch(
                m.info.max_batch, int(m.info.extra.get("sample_bytes", 0)), memory_budget_bytes
            )
            for mid, m in self._models.items()
        }
        self.costs = StepCosts()
        self.quality = QualityGovernor(self.costs, self.max_batch, quality, on_quality_change)
        self.frames_dropped_closed = 0
        self.input_dropped_closed = 0
        self._horizon = horizon_s
        self._step_threads = step_threads
        self._pipeline_depth = pipeline_depth
        self.sessions: dict[str, SessionActor] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model-step")
        self._wake = asyncio.Event()
        self._lead = WAKE_LEAD_S + (
            HOST_LEAD_S if any(isinstance(m, ModelHost) for m in self._models.values()) else 0.0
        )
        self._task: asyncio.Task[None] | None = None
        self._flight: collections.deque[_Launched] = collections.deque()
        self._quiet = False
        """Set by ``quiesce``: no more batches are launched."""
        self._release_tail: asyncio.Task[None] | None = None
        self.lease: Callable[[], tuple[int, float]] = lambda: (0, math.inf)
        """This worker's registration lease: (grants so far, until when it surely holds,
        monotonic) (``LeasedKey.grants``, ``valid_until``). Past it, or under a lease
        granted anew after one lapsed, its sessions may have been moved."""
        self.verified_grant = 0
        """The grant under which the placements were last verified (set to the first
        grant at start: the worker holds no session before it registers)."""
        self.verify_placements: Callable[[], Coroutine[Any, Any, object]] | None = None
        """Checks that every session is still placed here, dropping those that are not
        (``WorkerRuntime.check_placements``): run before frames go out past the lease."""
        self._verifying: asyncio.Task[object] | None = None
        self.frames_total = 0
        self.steps_total = 0

    def start(self) -> asyncio.Task[None]:
        """Start the step loop; the returned task ends only if the loop crashes."""
        self._executor.submit(torch.set_num_threads, self._step_threads).result()
        self._task = asyncio.create_task(self._run(), name="worker-step-loop")
        return self._task

    def add(self, actor: SessionActor) -> None:
        hosted = isinstance(self._models.get(actor.spec.model_id), ModelHost)
        actor.pipeline = self._pipeline_depth if hosted else 1
        self.sessions[actor.session_id] = actor
        self.quality.add(actor)
        self.wake()

    def remove(self, session_id: str) -> SessionActor | None:
        actor = self.sessions.pop(session_id, None)
        self.quality.remove(session_id)
        if actor is not None:
            self.frames_dropped_closed += actor.dropped
            self.input_dropped_closed += actor.input_dropped
            actor.closed = True
            actor.notify()
        return actor

    def drop(self, session_id: str, reason: WindflowError) -> SessionActor | None:
        """Remove a session this worker can no longer serve (``SessionActor.lost``): its
        attached stream ends with ``reason`` once the frames already queued are out."""
        actor = self.sessions.get(session_id)
        if actor is not None:
            actor.lost = reason
            log.warning(
                "session %s dropped here: %s",
                session_id,
                reason.message,
                extra={"session_id": session_id},
            )
        return self.remove(session_id)

    def wake(self) -> None:
        self._wake.set()

    async def in_step_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking model work (restore, replay) in the model-step thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _batch_s(self, model_id: str, steps: int, batch: int) -> float | None:
        ms = self.costs.batch_ms(model_id, steps, batch)
        return None if ms is None else ms / 1000.0

    def _batch_horizon(self, slots: list[scheduler.Slot]) -> float:
        """Sessions due before the most urgent batch would finish join it: waiting for the
        next batch would make them later, and a bigger batch costs less per frame. So the
        horizon is the predicted time of that batch (at least the configured horizon)."""
        urgent = min(
            (s for s in slots if s.ready and not s.lockstep), key=lambda s: s.due, default=None
        )
        if urgent is None:
            return self._horizon
        ms = self.costs.batch_ms(urgent.model_id, urgent.steps, self.max_batch[urgent.model_id])
        return max(self._horizon, (ms or 0.0) / 1000.0)

    @property
    def frames_dropped(self) -> int:
        return self.frames_dropped_closed + sum(a.dropped for a in self.sessions.values())

    @property
    def input_dropped(self) -> int:
        """Input frames dropped (newest wins), this worker's sessions' all told."""
        return self.input_dropped_closed + sum(a.input_dropped for a in self.sessions.values())

    async def calibrate(self, repeats: int = TIMING_REPEATS) -> None:
        """Measure each model's batch cost (step + encode at its native size) at batch 1
        and at its max batch, for every rung of its step ladder, in the step thread."""
        loop = asyncio.get_running_loop()
        for model_id, model in self._models.items():
            for steps in model.info.steps:
                for batch in sorted({1, self.max_batch[model_id]}):
                    ms = await loop.run_in_executor(
                        self._executor, time_step, model, steps, batch, repeats
                    )
                    self.costs.observe(model_id, steps, batch, ms)

    async def recheck_while_idle(self, every_s: float, on_change: Callable[[], None]) -> None:
        """While the worker has no session, re-time each model's reference batch (batch 1
        at its default steps) every ``every_s``; where it is off the prediction by more
        than RECHECK_TOLERANCE either way, rescale the model's costs (``StepCosts.rescale``)
        and call ``on_change`` (the worker re-publishes its headroom). Runs until
        cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            changed = False
            for model_id, model in self._models.items():
                if self.sessions or self._flight or self._quiet:
                    break  # its own steps measure it now
                steps = model.info.default_steps
                predicted = self.costs.batch_ms(model_id, steps, 1)
                if predicted is None or predicted <= 0:
                    continue
                ms = await loop.run_in_executor(
                    self._executor, time_step, model, steps, 1, TIMING_REPEATS
                )
                factor = ms / predicted
                if self.sessions or abs(math.log(factor)) <= math.log(RECHECK_TOLERANCE):
                    continue
                self.costs.rescale(model_id, factor)
                changed = True
                log.info(
                    "step costs of %s rescaled by %.2f (a batch of 1 at %d steps took "
                    "%.2f ms, %.2f ms predicted)",
                    model_id,
                    factor,
                    steps,
                    ms,
                    predicted,
                )
            if changed:
                on_change()

    def _slots(self) -> list[scheduler.Slot]:
        return [
            scheduler.Slot(
                a.session_id,
                a.spec.model_id,
                a.steps,
                a.control_arrived
                if a.lockstep
                else scheduler.start_due(a.due, a.interval, a.control_waiting),
                a.ready,
                a.lockstep,
                a.expecting_control,
            )
            for a in self.sessions.values()
        ]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        max_batch = self.max_batch
        flight = self._flight
        while True:
            while flight and flight[0].reply.done():
                self._complete(flight.popleft())
            if self._pipeline_full():
                self._wake.clear()  # (the reply's callback wakes us)
                if not flight[0].reply.done():
                    await self._wake.wait()
                continue
            slots = [] if self._quiet else self._slots()
            now = time.monotonic()
            # With a batch in flight, plan as the loop would when it ends: a batch due by
            # then is launched now and waits in the host, which starts it as soon as the
            # one before is done (and not before its start time).
            at = max(now, flight[-1].end) + self._lead if flight else now + self._lead
            batches = scheduler.plan(
                slots,
                at,
                horizon=self._batch_horizon(slots),
                max_batch=max_batch,
                cost_s=self._batch_s,
            )
            launched = False
            for batch in batches:
                if self._pipeline_full():
                    break
                actors = [self.sessions[s] for s in batch.session_ids if s in self.sessions]
                actors = [a for a in actors if a.ready]
                if actors:
                    flight.append(self._launch(loop, batch, actors, at))
                    launched = True
            if launched:
                continue
            wakeup = scheduler.next_wakeup(slots, now)
            self._wake.clear()
            if flight and flight[0].reply.done():
                continue
            # (a timer that sets the event, not wait_for: that wraps the wait in a task of
            # its own, a turn of the loop more between a reply and its frames)
            timer = None
            if wakeup is not None:
                timer = loop.call_later(max(0.0, wakeup - self._lead - now), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _pipeline_full(self) -> bool:
        """As many batches in flight as the newest one allows (``_Launched.depth``)."""
        return bool(self._flight) and len(self._flight) >= self._flight[-1].depth

    def _launch(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: scheduler.Batch,
        actors: list[SessionActor],
        planned_at: float,
    ) -> _Launched:
        """Take the batch's controls and send it to its model; ``_complete`` takes the
        result. Its sessions' next frames may be planned meanwhile (``actor.pipeline``)."""
        model = self._models[batch.model_id]
        # the earliest start the batch may have (before its controls are taken: a waiting
        # control lets its frame start early)
        start = min(scheduler.start_due(a.due, a.interval, a.control_waiting) for a in actors)
        controls = [a.take_control() for a in actors]
        indices = [a.next_frame for a in actors]
        dues = [a.due for a in actors]
        ready_us = telemetry.now_us()
        appends: dict[int, asyncio.Task[None]] = {}
        captures = [Capture.NONE] * len(actors)
        if self.journal is not None:
            for i, (a, c) in enumerate(zip(actors, controls, strict=True)):
                entry = self.journal.entry_for(a, c.control, batch.steps)
                if entry is not None:
                    appends[i] = asyncio.create_task(
                        self.journal.append(a, entry), name=f"log-append:{a.session_id}"
                    )
                captures[i] = self.journal.captures(a, indices[i] + 1)
        for a in actors:
            a.begin_step()
            a.due += a.interval  # the next frame's, until _complete settles it
        encodings = [
            Encoding(a.spec.format, a.spec.width, a.spec.height, a.spec.jpeg_quality)
            for a in actors
        ]
        states = [a.state for a in actors]
        applied = [c.control for c in controls]
        span = tracer.start_span(names.SPAN_WORKER_STEP, attributes={"windflow.batch": len(actors)})
        reply: asyncio.Future[StepResult]
        if isinstance(model, ModelHost):  # in its own process: no thread needed
            reply = model.submit_step_and_encode(
                states,
                applied,
                batch.steps,
                encodings,
                captures,
                start_at_us=telemetry.now_us() + int((start - time.monotonic()) * 1e6),
            )
            depth = self._pipeline_depth
        else:
            reply = loop.run_in_executor(
                self._executor,
                step_and_encode,
                model,
                states,
                applied,
                batch.steps,
                encodings,
                captures,
            )
            depth = 1
        launched = _Launched(
            batch.model_id,
            batch.steps,
            model,
            actors,
            controls,
            indices,
            dues,
            appends,
            ready_us,
            reply,
            max(start, planned_at - self._lead)
            + (self.costs.batch_ms(batch.model_id, batch.steps, len(actors)) or 0.0) / 1000.0,
            depth,
            span,
            self.wake,
        )
        reply.add_done_callback(launched.finish)
        return launched

    def _complete(self, launched: _Launched) -> None:
        actors, dues = launched.actors, launched.dues
        model = launched.model
        launched.span.end()
        for a in actors:
            a.end_step()
        try:
            result = launched.reply.result()
        except Exception as exc:
            if isinstance(model, ModelHost) and model.lost:
                exit_worker(model)
            # A failed step ends the sessions in it (their state may be half-updated);
            # every other session on this worker goes on.
            log.exception("model step failed for %s", ",".join(a.session_id for a in actors))
            for a in actors:
                if a.session_id in self.sessions:
                    self.drop(
                        a.session_id,
                        Unavailable(
                            f"model step failed on this worker ({exc}); the session is "
                            "restored from its durable state"
                        ),
                    )
            return
        # What the next plan needs happens here; frames whose control-log entries are
        # still being acknowledged go out from a release task, so the next batch does not
        # wait for the log server.
        finished = launched.finished
        self.steps_total += 1
        self.costs.observe(
            launched.model_id, launched.steps, len(actors), result.model_ms + sum(result.encode_ms)
        )
        next_dues = []
        for i, actor in enumerate(actors):
            if actor.lockstep:
                actor.due = finished  # (it waited from here: the longest waiting goes first)
                next_dues.append(finished)
            elif actor.inflight == 0:
                actor.due = scheduler.next_due(dues[i], actor.interval, finished)
                next_dues.append(actor.due)
            else:  # its next frame is in flight already, due where it was launched
                next_dues.append(dues[i] + actor.interval)
            actor.unreleased += 1
        self.quality.after_step(actors, dues, finished)
        step = _Stepped(
            launched.steps,
            actors,
            [a.generation for a in actors],
            launched.indices,
            dues,
            next_dues,
            launched.controls,
            launched.appends,
            result,
            launched.ready_us,
            wall_offset_us := telemetry.now_us() - int(time.monotonic() * 1e6),
            int(finished * 1e6) + wall_offset_us,
        )
        tail = self._release_tail
        if not launched.appends and (tail is None or tail.done()) and self._lease_holds():
            # nothing to wait for: send now. (With a model host a batch due meanwhile is
            # in the host already; a model in this process waits for the loop, but sending
            # these on a later turn, beside the next batch, measured worse: the loop's
            # Python work then contends for the GIL with the step thread, bench runtime,
            # 2 sessions 0.68 vs 0.87 of raw.)
            self._send_now(step)
        else:
            self._release_tail = asyncio.create_task(
                self._release(tail, step), name="worker-release"
            )

    def _send_now(self, step: _Stepped) -> None:
        try:
            self._send_frames(step, set())
        finally:
            for actor in step.actors:
                actor.unreleased -= 1

    async def _release(self, previous: asyncio.Task[None] | None, step: _Stepped) -> None:
        """Send a batch's frames, after those of the batch before (frames leave in order),
        each once its control-log entry is acknowledged by the server."""
        try:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            unlogged = await self._await_appends(step)
            await self._fence()
            self._send_frames(step, unlogged)
        finally:
            for actor in step.actors:
                actor.unreleased -= 1
            # a session held back by its unreleased frames (PAUSE, or a slow log server)
            # may be ready now, and the loop may be asleep with nothing else to wake it
            self.wake()

    def _lease_holds(self) -> bool:
        grant, until = self.lease()
        return grant == self.verified_grant and time.monotonic() < until

    async def _fence(self) -> None:
        """Past this worker's lease, or under a lease granted anew after one lapsed (a
        stall: SIGSTOP, a long pause), its sessions may have moved to other workers, which
        may be making their frames now; a session needing no log append is fenced by
        nothing else. So frames go out only after a check that their sessions are still
        placed here (it drops those that are not, and their frames are not sent): once
        per new grant, and before every release while the lease is past its term. An
        unreachable etcd holds them until it answers."""
        while not self._lease_holds() and self.verify_placements is not None:
            grant, _ = self.lease()
            if self._verifying is None or self._verifying.done():
                self._verifying = asyncio.create_task(
                    self.verify_placements(), name="verify-placements"
                )
            try:
                await asyncio.shield(self._verifying)
                self.verified_grant = max(self.verified_grant, grant)
                return
            except Exception:
                log.warning("placements unverified past the lease; frames held", exc_info=True)
                await asyncio.sleep(FENCE_RETRY_S)

    async def _await_appends(self, step: _Stepped) -> set[int]:
        """The batch's sessions whose control-log entry did not land; each is dropped
        here (``Journal.append`` retries until it lands, so only a fence, the session's
        removal or a bug ends it). Never raises: the frames of the others go out."""
        unlogged: set[int] = set()
        for i, task in step.appends.items():
            actor = step.actors[i]
            try:
                await task
            except Exception as exc:
                unlogged.add(i)
                if isinstance(exc, Fenced):
                    reason: WindflowError = Unavailable(
                        f"session {actor.session_id} moved to another worker: {exc.message}"
                    )
                elif isinstance(exc, ResourceExhausted):
                    reason = exc  # its log is full: the client is told; no recovery helps
                else:
                    if not isinstance(exc, WindflowError):
                        log.error(
                            "session %s: control log append for frame %d failed",
                            actor.session_id,
                            step.indices[i],
                            exc_info=exc,
                        )
                    reason = Unavailable(
                        f"the control log entry of frame {step.indices[i]} did not land: {exc}"
                    )
                if actor.session_id in self.sessions:
                    self.drop(actor.session_id, reason)
        return unlogged

    def _send_frames(self, step: _Stepped, unlogged: set[int]) -> None:
        result, controls, indices, dues = step.result, step.controls, step.indices, step.dues
        actors, wall_offset_us = step.actors, step.wall_offset_us
        for i, actor in enumerate(actors):
            if actor.closed or i in unlogged or actor.generation != step.generations[i]:
                continue  # closed, not logged, or rewound meanwhile (another future now)
            actor.durable_head = indices[i] + 1
            if self.journal is not None:
                self.journal.keep(actor, indices[i] + 1, result.snapshots[i], result.copies[i])
            message = pb.ServerMessage()
            # set in place, field by field: a Frame built from keyword arguments and then
            # wrapped copies the pixels and every nested message again (2-4x the time)
            frame = message.frame
            frame.frame_index = indices[i]
            frame.format = actor.spec.format
            frame.width = actor.spec.width
            frame.height = actor.spec.height
            frame.data = result.frames[i]
            frame.steps = step.steps
            frame.action = controls[i].control.action
            frame.control_client_time_us = controls[i].client_time_us
            frame.applied_client_time_us.extend(controls[i].client_times)
            frame.input_dropped_total = actor.input_dropped
            ts = frame.timestamps
            ts.due_us = int(dues[i] * 1e6) + wall_offset_us
            ts.next_due_us = int(step.next_dues[i] * 1e6) + wall_offset_us
            ts.model_start_us = result.model_start_us
            ts.model_end_us = result.model_end_us
            ts.encoded_us = result.encoded_us[i]
            ts.stepped_us = step.stepped_us
            ts.control_received_us = controls[i].received_us
            latency = frame.latency
            latency.queue_ms = max(0.0, (result.model_start_us - step.ready_us) / 1000.0)
            latency.model_ms = result.model_ms
            latency.encode_ms = result.encode_ms[i]
            latency.batch_size = len(actors)
            actor.push(message)
            if telemetry.recording():
                tracer.start_span(
                    names.SPAN_WORKER_FRAME,
                    context=actor.trace_context,
                    start_time=result.model_start_us * 1000,
                    attributes={
                        "windflow.session_id": actor.session_id,
                        "windflow.frame": indices[i],
                        "windflow.batch": len(actors),
                    },
                ).end()
            self.frames_total += 1

    async def quiesce(self) -> None:
        """Launch no more batches; return once those in flight are done and their frames
        released (pushed to their sessions' queues)."""
        self._quiet = True
        self.wake()
        while self._flight or (self._release_tail is not None and not self._release_tail.done()):
            if self._flight:
                with contextlib.suppress(Exception):
                    await self._flight[-1].reply
                await asyncio.sleep(0)  # the loop completes it
            else:
                assert self._release_tail is not None
                with contextlib.suppress(Exception):
                    await self._release_tail

    async def aclose(self) -> None:
        for launched in self._flight:
            launched.reply.cancel()
            launched.span.end()
        self._flight.clear()
        for task in (self._task, self._release_tail):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._release_tail = None
        self._executor.shutdown(wait=True, cancel_futures=True)
