"""Letting sessions go while nobody streams them (docs/access.md): the worker's half of
reclaiming (a detached session parked: checkpointed at its head, its slot freed) and of a
token's budget running out (the stream ends at a frame boundary, checkpointed there).

The decisions are the session service's (``services/session/reclaim.py``) and the
gateway's; this only carries them out safely: each refuses a session that is in use.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from services.worker.actor import SessionActor
from services.worker.messages import event
from windflow.errors import FailedPrecondition, WindflowError
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

if TYPE_CHECKING:
    from services.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class Reclaiming:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime

    def check_unattached(self, actor: SessionActor, epoch: int, min_idle_s: float) -> None:
        """The reclaimer's close: only a session no client ever attached to, waiting for
        ``min_idle_s`` at ``epoch`` (else FAILED_PRECONDITION)."""
        self.check_idle(actor, epoch, min_idle_s)
        if actor.ever_attached:
            raise FailedPrecondition(f"session {actor.session_id} was attached: it is parked")

    def check_idle(self, actor: SessionActor, epoch: int, min_idle_s: float) -> None:
        """Refuse to reclaim ``actor`` unless it is here at ``epoch`` and has been without
        a client for ``min_idle_s`` (the reclaimer's view may be a moment old)."""
        if epoch and actor.epoch != epoch:
            raise FailedPrecondition(
                f"session {actor.session_id} is here at epoch {actor.epoch}, not {epoch}"
            )
        idle = actor.idle_s(time.monotonic())
        if actor.attached or actor.parking or idle < min_idle_s:
            raise FailedPrecondition(
                f"session {actor.session_id} is in use (attached {actor.attached}, idle "
                f"{idle:.1f} s of {min_idle_s:.1f} s)"
            )

    async def park(self, request: internal_pb2.ParkSessionRequest) -> internal_pb2.SessionStatus:
        """Checkpoint a detached session at its head and let it go: its slot is free, and
        a restore of its log's head (the next attach, anywhere) starts from that checkpoint
        with nothing to replay. Refused (FAILED_PRECONDITION) while a client is attached,
        or before ``min_idle_s`` without one; an attach meanwhile is refused (UNAVAILABLE:
        its gateway asks the router, which restores it once it is parked)."""
        rt = self._rt
        actor = rt.actor(request.session_id)
        self.check_idle(actor, request.epoch, request.min_idle_s)
        actor.parking = True
        try:
            await rt.hold(actor)
            await self.checkpoint_head(actor)
        except BaseException:
            actor.parking = False
            rt.release(actor)
            raise
        status = rt.status(request.session_id)
        rt.engine.remove(request.session_id)
        rt.changed()
        log.info(
            "parked session %s at frame %d (idle %.1f s)",
            request.session_id,
            status.head_frame,
            status.idle_s,
            extra={"session_id": request.session_id},
        )
        return status

    async def checkpoint_head(self, actor: SessionActor) -> None:
        """A durable checkpoint at a held actor's next frame (unless there is one): a
        restore there (parked, or a budget that ran out) replays nothing."""
        rt = self._rt
        journal = rt.durable()
        await actor.wait_uploaded()
        frame = actor.next_frame
        if frame > 0 and frame not in await journal.checkpoint_frames(actor.session_id):
            state = actor.state
            blob = await rt.engine.in_step_thread(lambda: actor.model.snapshot(state))
            await journal.save_checkpoint(actor, frame, blob)

    async def budget_spent(self, actor: SessionActor, stop: int) -> pb.ServerMessage:
        """The stream's token may have no frame from ``stop`` on: checkpoint the session
        there (it stays, detached once the stream ends) and say so."""
        rt = self._rt
        if rt.journal is not None:
            await rt.hold(actor)
            try:
                await self.checkpoint_head(actor)
            except WindflowError as err:  # the log still brings it back there
                log.warning("session %s: no checkpoint at %d: %s", actor.session_id, stop, err)
            finally:
                rt.release(actor)
        log.info(
            "session %s: its token's budget ends at frame %d; stream ended",
            actor.session_id,
            stop,
            extra={"session_id": actor.session_id},
        )
        return event(
            pb.SessionEvent.KIND_BUDGET_EXHAUSTED,
            "the token's streaming budget is spent; the session is checkpointed here",
            stop,
            actor.steps,
        )
