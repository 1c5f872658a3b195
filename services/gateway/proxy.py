"""One client stream proxied to the worker holding its session, across worker failures.

The proxy reads the client's messages in its own task and writes them to the current
worker leg. It remembers the last frame it forwarded and the controls the client sent for
frames not yet delivered (bounded). When the worker leg fails with UNAVAILABLE, it asks the
router to recover the session (re-place it if the worker is really gone), attaches to the
new worker with ``resume_from = last forwarded + 1`` and re-sends those controls: the
client sees a pause, a KIND_RECOVERED event, then the next frame index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from opentelemetry import context as otel_context

from services.gateway.access import Budget
from windflow.common import grpc_util, metrics, names, telemetry
from windflow.common.controls import PendingControls
from windflow.errors import Internal, NotFound, ResourceExhausted, Unavailable
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

# What grpc-python reports, in place of a call's real status, when a write on it raced with
# its end (a worker leg ending UNAVAILABLE while a control or ack is being forwarded, as in
# a drain): a broken leg like any other, which the router's Recover judges.
BROKEN_LEG_DETAILS = "Internal error from Core"
MIGRATION_SWITCH_WAIT_S = 2.0
"""After a live migration's placement lands, how long the old leg may take to deliver
the frames before the cut-over; then the leg switches anyway (the new worker goes back to
the first frame the client did not get)."""


class StreamProxy:
    def __init__(
        self,
        first: pb.ClientMessage,
        placement: internal_pb2.PlacementRecord,
        worker: Callable[[str], internal_pb2_grpc.WorkerStub],
        router: internal_pb2_grpc.RouterStub,
        *,
        recover_timeout_s: float,
        moved: Callable[[str, int], Awaitable[internal_pb2.PlacementRecord | None]] | None = None,
        on_end: Callable[[str, int], None] | None = None,
        tenant: str = "",
        token_id: str = "",
        budget: Budget | None = None,
        token_usage: Callable[[str], Awaitable[float]] | None = None,
    ) -> None:
        """``tenant``, ``token_id``: whom the worker bills the frames to; ``budget``: the
        frames the stream's token may still deliver (None: no cap), checked against the
        token's ledger (``token_usage``) every second of frames, so that the token's other
        streams count too (docs/access.md)."""
        self.session_id = first.attach.session_id
        self._tenant = tenant
        self._token_id = token_id
        self._budget = budget
        self._token_usage = token_usage
        self._since_ledger = 0
        """Frames forwarded since the ledger was last asked."""
        self._on_end = on_end
        """Told, when the client's stream ends, the frame after the last one it received
        (``GatewayService`` records it: ``DeliveredHeads``)."""
        self._moved = moved
        """Returns the session's placement once it names an epoch other than the one given
        (``GatewayService.placement_moved``): the leg is then switched, even when the
        worker it streams from hangs without closing it; a live migration's, at its
        cut-over frame."""
        self._leg_moved = False
        self._moved_to: internal_pb2.PlacementRecord | None = None
        """Where the watch saw a live migration take the session (the next leg's worker,
        without asking the router)."""
        self._forwarded = asyncio.Event()
        """Set whenever a frame is forwarded (a migration's switch waits for its cut-over)."""
        self._attach = first.attach
        self.placement = placement
        self._worker = worker
        self._router = router
        self._recover_timeout = recover_timeout_s
        self._call: grpc.aio.StreamStreamCall | None = None
        self._leg_ready = asyncio.Event()
        """Set once the current worker leg has taken its Attach: a call takes one write at
        a time, and nothing may overtake the Attach."""
        self._controls = PendingControls()
        """Controls the client sent for frames not forwarded yet, less those refused."""
        for control in first.attach.controls:
            self._controls.sent(control)
        self.last_forwarded = -1
        self._attached = False
        """The first leg's KIND_ATTACHED came (and set ``last_forwarded`` to its head - 1):
        a recovery resumes the stream; before it, one attaches afresh."""
        self._same_worker_retries = 0
        self._legs = 0
        """Worker legs attached so far."""
        self.recoveries = 0
        self.trace_context: otel_context.Context | None = None
        """The stream span's context: parent of the worker legs and the frame spans."""

    async def run(
        self, requests: AsyncIterator[pb.ClientMessage]
    ) -> AsyncIterator[pb.ServerMessage]:
        reader = asyncio.create_task(
            self._read_client(requests), name=f"gateway-read:{self.session_id}"
        )
        try:
            resume = False
            while True:
                try:
                    async for message in self._leg(resume):
                        yield message
                    return
                except (Unavailable, Internal, NotFound) as err:
                    # NOT_FOUND: the placed worker does not hold the session (it dropped
                    # it, or a recovery placed it where no OpenSession landed): the
                    # router re-places it
                    if isinstance(err, Internal) and err.message != BROKEN_LEG_DETAILS:
                        raise
                    if reader.done() and reader.exception() is not None:
                        raise
                    if self._moved_to is None or not self._moved_to.cutover_frame:
                        log.warning(
                            "session %s lost worker %s (%s); recovering",
                            self.session_id,
                            self.placement.worker_id,
                            err.message,
                        )
                    started = time.monotonic()
                    previous = self.placement
                    moved_to, self._moved_to = self._moved_to, None
                    if moved_to is not None and moved_to.epoch > previous.epoch:
                        # a live migration the watch saw: its target holds the session
                        # already (a crash recovery's new worker may not yet: the router
                        # answers once it does)
                        self.placement = moved_to
                    else:
                        await self._recover(resume=self._attached)
                    self.recoveries += 1
                    resume = self._attached
                    moved = self._moved_event(previous, started)
                    kind = (
                        "migrated" if moved.kind == pb.SessionEvent.KIND_MIGRATED else "recovered"
                    )
                    metrics.get().stream_recoveries.add(1, {"kind": kind})
                    yield pb.ServerMessage(event=moved)
        finally:
            if self._on_end is not None and self._attached and not self.spectating:
                self._on_end(self.session_id, self.last_forwarded + 1)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if self._call is not None:
                self._call.cancel()

    @property
    def spectating(self) -> bool:
        """The stream's role now (a Handover moves it: KIND_ROLE_CHANGED)."""
        return self._attach.role == pb.ROLE_SPECTATOR

    def _moved_event(
        self, previous: internal_pb2.PlacementRecord, started: float
    ) -> pb.SessionEvent:
        """What the client is told of a new leg: KIND_MIGRATED after a live migration
        (the placement carries its cut-over), else KIND_RECOVERED."""
        now = self.placement
        migrated = now.cutover_frame > 0 and now.epoch > previous.epoch
        took = f"{(time.monotonic() - started) * 1000:.0f} ms"
        return pb.SessionEvent(
            kind=pb.SessionEvent.KIND_MIGRATED if migrated else pb.SessionEvent.KIND_RECOVERED,
            message=(
                f"migrated from worker {previous.worker_id} to {now.worker_id} "
                f"(region {now.region or '?'}); switched in {took}"
                if migrated
                else f"moved to worker {now.worker_id} in {took}"
            ),
            frame_index=self.last_forwarded + 1,
            worker_id=now.worker_id,
            from_worker_id=previous.worker_id,  # (the leg's worker: a migration's source)
            region=now.region,
        )

    async def _leg(self, resume: bool) -> AsyncIterator[pb.ServerMessage]:
        attach = pb.Attach()
        attach.CopyFrom(self._attach)
        if resume and not self.spectating:
            # (a spectator sees the session's frames as they are made: it attaches afresh)
            attach.resume = True
            attach.resume_from = self.last_forwarded + 1
            del attach.controls[:]
            attach.controls.extend(self._controls.to_resend(self.last_forwarded))
        self._leg_ready.clear()
        call = self._worker(self.placement.worker_address).Attach(metadata=self._leg_metadata())
        self._call = call
        try:
            await call.write(pb.ClientMessage(attach=attach))
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc) from exc
        if not resume and self._legs:
            # a fresh attach after a leg that failed before its first frame: controls the
            # client sent on the stream meanwhile may have gone to the failed leg only
            in_attach = list(self._attach.controls)
            for control in [c for c in self._controls.to_resend(-1) if c not in in_attach]:
                try:
                    await call.write(pb.ClientMessage(control=control))
                except grpc.aio.AioRpcError as exc:
                    raise grpc_util.error_from_rpc(exc) from exc
        self._legs += 1
        self._leg_ready.set()
        self._leg_moved = False
        watcher = (
            asyncio.create_task(
                self._follow(call, self.placement.epoch), name=f"gateway-follow:{self.session_id}"
            )
            if self._moved is not None
            else None
        )
        try:
            async for message in self._forward(call):
                yield message
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from a call cancelled locally: ours (the
            # session moved) is a broken leg, a cancellation of this task is not
            task = asyncio.current_task()
            if not self._leg_moved or (task is not None and task.cancelling()):
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if self._leg_moved:
            raise Unavailable(
                f"session {self.session_id} moved off worker {self.placement.worker_id}"
            )

    def _leg_metadata(self) -> list[tuple[str, str]]:
        """A worker leg's call metadata: the trace, whom to bill, where the budget ends."""
        metadata = telemetry.inject_metadata(self.trace_context)
        metadata += [
            (names.METADATA_TENANT, self._tenant),
            (names.METADATA_TOKEN_ID, self._token_id),
        ]
        if self._budget is not None:
            metadata.append((names.METADATA_BUDGET_FRAMES, str(max(1, self._budget.frames_left))))
        return metadata

    async def _spend(self) -> AsyncIterator[pb.ServerMessage]:
        """One frame forwarded against the budget: its warnings; once a second of frames,
        the ledger's figure for the token (its other streams included): spent, the stream
        ends here (KIND_BUDGET_EXHAUSTED, then RESOURCE_EXHAUSTED). The worker itself stops
        the stream exactly where this stream's own share runs out."""
        budget = self._budget
        if budget is None:
            return
        for warning in budget.delivered(1):
            warning.frame_index = self.last_forwarded + 1
            yield pb.ServerMessage(event=warning)
        self._since_ledger += 1
        if self._token_usage is None or self._since_ledger < max(1, round(budget.fps)):
            return
        self._since_ledger = 0
        try:
            used = await self._token_usage(budget.token_id)
        except Exception:  # the ledger unreadable: the worker's own cap still holds
            log.warning("session %s: the token's usage could not be read", self.session_id)
            return
        if budget.ledger_says(used):
            at = self.last_forwarded + 1
            yield pb.ServerMessage(
                event=pb.SessionEvent(
                    kind=pb.SessionEvent.KIND_BUDGET_EXHAUSTED,
                    message=f"the token's streaming budget ({budget.budget_s:g} s) is spent",
                    frame_index=at,
                )
            )
            raise ResourceExhausted(
                f"the token's streaming budget is spent; attach with a new token and "
                f"resume_from={at} to go on"
            )

    async def _follow(self, call: grpc.aio.StreamStreamCall, epoch: int) -> None:
        """End the leg once the session's placement moves past ``epoch``."""
        assert self._moved is not None
        try:
            record = await self._moved(self.session_id, epoch)
        except asyncio.CancelledError:
            raise
        except Exception:  # (etcd unreachable: the leg's own failure still recovers)
            log.warning("session %s: watching its placement failed", self.session_id, exc_info=True)
            return
        if record is not None and record.cutover_frame:
            # A live migration: the old worker makes every frame before the cut-over and
            # then ends this leg; switch once they are through (or it went quiet).
            self._moved_to = record
            deadline = time.monotonic() + MIGRATION_SWITCH_WAIT_S
            while self.last_forwarded + 1 < record.cutover_frame:
                self._forwarded.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._forwarded.wait(), left)
            log.info(
                "session %s migrated to %s at frame %d; switching legs",
                self.session_id,
                record.worker_id,
                record.cutover_frame,
            )
            self._leg_moved = True
            call.cancel()
            return
        log.warning(
            "session %s moved past epoch %d while attached to %s; switching legs",
            self.session_id,
            epoch,
            self.placement.worker_id,
        )
        self._leg_moved = True
        call.cancel()

    async def _forward(self, call: grpc.aio.StreamStreamCall) -> AsyncIterator[pb.ServerMessage]:
        """The leg's messages, as the client gets them (no repeat; refusals remembered)."""
        async for message in _responses(call):
            if not message.HasField("frame"):
                if message.event.kind == pb.SessionEvent.KIND_REWOUND:
                    # the session's future restarts at frame_index
                    self.last_forwarded = message.event.frame_index - 1
                    self._controls.rewound()
                elif message.event.kind == pb.SessionEvent.KIND_ATTACHED and not self._attached:
                    # the stream starts at the session's head: a recovery before its first
                    # frame resumes there (not at frame 0)
                    self._attached = True
                    self.last_forwarded = message.event.frame_index - 1
                elif message.event.kind == pb.SessionEvent.KIND_ROLE_CHANGED:
                    # a recovery re-attaches it in its role now
                    self._attach.role = message.event.role
                    del self._attach.controls[:]
                elif message.HasField("error") and message.error.HasField("control"):
                    self._controls.refused(message.error.control)  # never re-sent
                yield message
                continue
            frame = message.frame
            if frame.frame_index <= self.last_forwarded:
                continue  # never a repeat
            span = (
                tracer.start_span(
                    names.SPAN_GATEWAY_FRAME,
                    context=self.trace_context,
                    start_time=frame.timestamps.worker_sent_us * 1000,
                    attributes={
                        "windflow.session_id": self.session_id,
                        "windflow.frame": frame.frame_index,
                    },
                )
                if telemetry.recording()
                else None
            )
            sent = telemetry.now_us()
            frame.timestamps.gateway_sent_us = sent
            frame.latency.transport_ms = (sent - frame.timestamps.worker_sent_us) / 1000.0
            self.last_forwarded = frame.frame_index
            self._forwarded.set()
            self._controls.received(frame.frame_index)
            yield message
            if span is not None:
                span.end()
            if self.spectating:
                continue  # (a spectator's frames are not billed: the controller's are)
            async for notice in self._spend():
                yield notice

    async def _recover(self, *, resume: bool) -> None:
        """Ask the router where the session is now (the same worker, when it still holds
        it; else where it re-placed it, restored at ``last_forwarded + 1`` when
        ``resume``). Retried until the recovery deadline while no worker can take it."""
        deadline = time.monotonic() + self._recover_timeout
        while True:
            try:
                placement = await grpc_util.call(
                    self._router.Recover(
                        internal_pb2.RecoverRequest(
                            session_id=self.session_id,
                            worker_id=self.placement.worker_id,
                            epoch=self.placement.epoch,
                            resume=resume,
                            resume_from=self.last_forwarded + 1 if resume else 0,
                        ),
                        timeout=self._recover_timeout,
                        metadata=telemetry.inject_metadata(self.trace_context),
                    )
                )
            except (Unavailable, ResourceExhausted) as err:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(err.retry_after_s or 0.2)
                continue
            same = (placement.worker_id, placement.epoch) == (
                self.placement.worker_id,
                self.placement.epoch,
            )
            self.placement = internal_pb2.PlacementRecord(
                worker_id=placement.worker_id,
                worker_address=placement.worker_address,
                epoch=placement.epoch,
                region=placement.region,
                cutover_frame=placement.cutover_frame,
            )
            if same:
                # the worker still holds it: attach there again, after a pause that grows
                # while its legs keep breaking
                self._same_worker_retries += 1
                await asyncio.sleep(min(1.0, 0.05 * self._same_worker_retries))
            else:
                self._same_worker_retries = 0
            return

    async def _read_client(self, requests: AsyncIterator[pb.ClientMessage]) -> None:
        async for message in requests:
            if message.HasField("control"):
                self._controls.sent(message.control)
            await self._leg_ready.wait()  # after the leg's Attach, never beside it
            call = self._call
            if call is None:
                continue
            try:
                await call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass  # a dead leg (failed, or ended under the write): re-sent on recovery
            except Exception:  # the reader must outlive a bad write, or acks stop
                log.exception("session %s: forwarding a client message failed", self.session_id)
        if self._call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await self._call.done_writing()


async def _responses(call: grpc.aio.StreamStreamCall) -> AsyncIterator[pb.ServerMessage]:
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise grpc_util.error_from_rpc(exc) from exc
