"""A worker's side of live migration (docs/migration.md): source and target in one class.

The router drives a move; each worker step is one RPC:

- target ``prepare``: reserve a slot, pull the session's state from the source
  (``FetchState``: a snapshot of its newest in-memory copy, in chunks, while the source
  keeps streaming), restore it, and replay the source's control log after it, in rounds,
  until it is within ``close_enough`` frames of the source's durable head;
- source ``stop``: make no frame from the cut-over frame F on (it goes on making the
  frames before F, and logging them);
- target ``catch_up``: follow the log to exactly F (as the source logs its last frames),
  then hold an actor at F, not stepped until the commit;
- the router moves the placement (source, e) -> (target, e + 1, F) in one transaction;
- target ``commit``: CLAIM the log at F (fencing any late append of the source) and make
  frames from F on; source ``handoff``: drop the session once its frames before F are out
  (its stream ends UNAVAILABLE, and the gateway switches to the target at F).

A failure before the transaction aborts: the target drops what it prepared and the source
goes on (``resume``). Neither waits for a router forever: a stop and a prepared target
each have a time to live, after which the worker reads the placement and goes on (or
leaves, or commits) as it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from services.worker.actor import SessionActor
from services.worker.models.base import SessionState, WorldModel
from windflow.common import grpc_util, metrics, telemetry
from windflow.common.durable import Fenced, StoredEntry, controls_by_frame
from windflow.common.specs import model_info_to_proto, resolve_spec
from windflow.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WindflowError,
)
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

if TYPE_CHECKING:
    from services.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
"""Bytes per ``StateChunk`` by default: well under gRPC's 4 MiB message limit."""
MAX_ROUNDS = 3
CLOSE_ENOUGH = 2
CLOSE_SLACK = 4
"""Frames more than ``close_enough`` a target may be behind after its last round and still
go on to the stop (the source makes a frame or two meanwhile); further behind, it aborts."""
STOP_TTL_S = 2.0
"""A stopped source with no RESUME or HANDOFF by then reads its placement and acts on it
(the router adds the time its last frames take: ``stop_ttl_s``)."""
INCOMING_TTL_S = 3.0
"""A target with no next step of its migration within this (after PREPARE, CATCH_UP)
reads the placement and acts on it: commits if it moved here, else drops what it holds."""
RPC_TIMEOUT_S = 5.0
CLAIM_ATTEMPTS = 3
"""CLAIMs a commit tries when the source appended meanwhile (its HEAD entry, as its stream
detached): each reads the log again."""


@dataclass(slots=True)
class Incoming:
    """A session being migrated to this worker, before its actor is committed."""

    session_id: str
    spec: pb.SessionSpec
    model: WorldModel
    epoch: int
    source_address: str
    source_epoch: int
    state: SessionState | None = None
    actor: SessionActor | None = None
    """Set once it caught up to the cut-over frame (held, not stepped, until COMMIT)."""
    expiry: asyncio.Task[None] | None = None
    ttl: float = INCOMING_TTL_S
    committing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One commit at a time (the router's, a stream's ``settle``, the time to live's)."""
    status: internal_pb2.MigrationStatus = field(default_factory=internal_pb2.MigrationStatus)


class Migrations:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime
        self.incoming: dict[str, Incoming] = {}
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._channels = grpc_util.Channels()
        self.placement_of: (
            Callable[[str], Awaitable[internal_pb2.PlacementRecord | None]] | None
        ) = None
        """Reads a session's placement (set by the worker's main): what a stop or a
        prepared target whose router went quiet acts on."""

    # ---- the source ----

    async def fetch_state(
        self, request: internal_pb2.FetchStateRequest
    ) -> AsyncIterator[internal_pb2.StateChunk]:
        """The session's state at a frame boundary, without pausing it where it can: the
        newest of its in-memory copies, serialized where the model runs. With none (a
        model too large for the ring), it is held for one snapshot of its live state."""
        rt = self._runtime
        actor = self._source(request.session_id, request.epoch)
        model = actor.model
        if actor.recent:
            frame, kept = next(reversed(actor.recent.items()))
            blob = await rt.engine.in_step_thread(lambda: model.snapshot(kept))
        else:
            await rt.hold(actor)
            try:
                state = actor.state
                frame = state.frame_index
                blob = await rt.engine.in_step_thread(lambda: model.snapshot(state))
            finally:
                rt.release(actor)
        size = request.chunk_bytes or CHUNK_BYTES
        version = model.info.version
        for offset in range(0, max(1, len(blob)), size):
            yield internal_pb2.StateChunk(
                frame_index=frame,
                total_bytes=len(blob),
                model_version=version,
                data=blob[offset : offset + size],
            )

    def _source(self, session_id: str, epoch: int) -> SessionActor:
        actor = self._runtime.actor(session_id)
        if actor.epoch != epoch or actor.awaiting_commit:
            raise FailedPrecondition(
                f"session {session_id} is here at epoch {actor.epoch}, not {epoch}"
            )
        return actor

    def stop(self, request: internal_pb2.MigrateOutRequest) -> internal_pb2.MigrationStatus:
        """Make no frame from the cut-over on: ``frame``, or the next frame plus ``lead``
        (a detached session makes no frame: its next one). Returns the cut-over."""
        actor = self._source(request.session_id, request.epoch)
        if actor.stop_at is not None:
            raise FailedPrecondition(f"session {request.session_id} is already migrating")
        lead = request.lead if actor.attached else 0
        actor.stop_at = max(request.frame, actor.next_frame + lead)
        ttl = request.stop_ttl_s or STOP_TTL_S
        self._stops[actor.session_id] = asyncio.create_task(
            self._stop_expires(actor, ttl), name=f"migration-stop:{actor.session_id}"
        )
        log.info(
            "session %s stops before frame %d (migrating)",
            actor.session_id,
            actor.stop_at,
            extra={"session_id": actor.session_id},
        )
        return internal_pb2.MigrationStatus(
            session_id=actor.session_id, frame=actor.stop_at, source_head=actor.durable_head
        )

    async def wait(self, request: internal_pb2.MigrateOutRequest) -> internal_pb2.MigrationStatus:
        """Return once the session's frames before ``frame`` are made and logged (its
        durable head reached it): a target catching up waits here instead of polling."""
        actor = self._source(request.session_id, request.epoch)
        while actor.durable_head < request.frame and not actor.closed:
            if actor.stop_at is not None and actor.stop_at < request.frame:
                raise FailedPrecondition(
                    f"session {actor.session_id} stops before frame {actor.stop_at}"
                )
            actor.frame_available.clear()
            await actor.frame_available.wait()
        return _source_status(actor)

    def resume(self, request: internal_pb2.MigrateOutRequest) -> internal_pb2.MigrationStatus:
        """The migration aborted: the source makes frames again."""
        actor = self._source(request.session_id, request.epoch)
        self._go_on(actor)
        return _source_status(actor)

    def _go_on(self, actor: SessionActor) -> None:
        task = self._stops.pop(actor.session_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if actor.stop_at is None:
            return
        actor.stop_at = None
        actor.due = max(actor.due, time.monotonic())
        self._runtime.engine.wake()
        log.info("session %s goes on here (migration aborted)", actor.session_id)

    def handoff(self, request: internal_pb2.MigrateOutRequest) -> internal_pb2.MigrationStatus:
        """The placement moved to the target: the session leaves once its frames before
        the cut-over are out (its stream then ends UNAVAILABLE: the gateway follows)."""
        actor = self._source(request.session_id, request.epoch)
        task = self._stops.pop(actor.session_id, None)
        if task is not None:
            task.cancel()
        self._leave(actor, request.to_worker_id, actor.stop_at or actor.next_frame)
        return _source_status(actor)

    def _leave(self, actor: SessionActor, to_worker: str, frame: int) -> None:
        rt = self._runtime
        rt.engine.remove(actor.session_id)
        metrics.get().worker_migrations.add(1, {"direction": "out"})
        actor.lost = Unavailable(
            f"session {actor.session_id} migrated to worker {to_worker} at frame {frame}"
        )
        actor.notify()
        rt.changed()
        log.info(
            "session %s handed off to %s at frame %d",
            actor.session_id,
            to_worker,
            frame,
            extra={"session_id": actor.session_id},
        )

    async def _stop_expires(self, actor: SessionActor, ttl: float) -> None:
        """No word from the router within ``ttl``: the placement decides."""
        await asyncio.sleep(ttl)
        record = await self._placement(actor.session_id)
        if self._runtime.engine.sessions.get(actor.session_id) is not actor:
            return
        if self._runtime.placed_here(record, actor.epoch):
            log.warning("session %s: its migration went quiet; it goes on here", actor.session_id)
            self._go_on(actor)
        else:
            self._stops.pop(actor.session_id, None)
            self._leave(actor, record.worker_id if record else "(none)", actor.next_frame)

    async def _placement(self, session_id: str) -> internal_pb2.PlacementRecord | None:
        assert self.placement_of is not None, "Migrations.placement_of is not set"
        while True:
            try:
                return await self.placement_of(session_id)
            except Exception:
                log.warning("session %s: placement unreadable; again", session_id, exc_info=True)
                await asyncio.sleep(0.5)

    # ---- the target ----

    async def prepare(self, request: internal_pb2.MigrateInRequest) -> internal_pb2.MigrationStatus:
        rt = self._runtime
        session_id = request.session_id
        model = rt.models.get(request.spec.model_id)
        if model is None:
            raise FailedPrecondition(
                f"model {request.spec.model_id!r} is not loaded on worker {rt.config.worker_id}"
            )
        if rt.cordoned or rt.stopping:
            raise FailedPrecondition(f"worker {rt.config.worker_id} is draining")
        if session_id in rt.engine.sessions or session_id in self.incoming:
            raise FailedPrecondition(f"session {session_id} is already on this worker")
        if rt.occupied >= rt.config.capacity:
            raise ResourceExhausted(
                f"worker {rt.config.worker_id} is full ({rt.config.capacity} sessions)",
                retry_after_s=1.0,
            )
        spec = resolve_spec(request.spec, model_info_to_proto(model.info))
        incoming = Incoming(
            session_id, spec, model, request.epoch, request.source_address, request.source_epoch
        )
        self.incoming[session_id] = incoming
        incoming.ttl = request.ttl_s or INCOMING_TTL_S
        try:
            t0 = time.perf_counter()
            frame, blob = await self._fetch(incoming)
            state = await rt.engine.in_step_thread(lambda: model.restore(blob))
            if state.frame_index != frame:
                raise FailedPrecondition(
                    f"the state copied holds frame {state.frame_index}, not {frame}"
                )
            status = incoming.status
            status.snapshot_frame = frame
            status.snapshot_bytes = len(blob)
            status.copy_ms = (time.perf_counter() - t0) * 1000.0
            incoming.state = state
            t1 = time.perf_counter()
            close = request.close_enough or CLOSE_ENOUGH
            for _ in range(request.max_rounds or MAX_ROUNDS):
                head = await self._source_head(incoming)
                status.source_head = head
                if head - state.frame_index <= close and status.rounds:
                    break
                await self._replay_to(incoming, head)
                status.rounds += 1
            behind = await self._source_head(incoming) - state.frame_index
            if behind > close + CLOSE_SLACK:
                # it replays slower than the source streams (a loaded worker): stopping the
                # source now would stall the client for the rest; abort instead
                raise FailedPrecondition(
                    f"worker {rt.config.worker_id} is still {behind} frames behind session "
                    f"{session_id} after {status.rounds} rounds: it cannot catch up"
                )
            status.replay_ms = (time.perf_counter() - t1) * 1000.0
            status.frame = state.frame_index
        except BaseException:
            self._forget(incoming)
            raise
        self._expire_later(incoming)  # the time to live runs from each step's end
        return _copy(status, session_id)

    def _expire_later(self, incoming: Incoming) -> None:
        if incoming.expiry is not None:
            incoming.expiry.cancel()
        incoming.expiry = asyncio.create_task(
            self._incoming_expires(incoming, incoming.ttl),
            name=f"migration-in:{incoming.session_id}",
        )

    async def _fetch(self, incoming: Incoming) -> tuple[int, bytes]:
        call = self._stub(incoming.source_address).FetchState(
            internal_pb2.FetchStateRequest(
                session_id=incoming.session_id, epoch=incoming.source_epoch
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=telemetry.inject_metadata(),
        )
        parts: list[bytes] = []
        frame = -1
        total = 0
        try:
            async for chunk in call:
                if frame < 0:
                    frame, total = chunk.frame_index, chunk.total_bytes
                    if chunk.model_version != incoming.model.info.version:
                        raise FailedPrecondition(
                            f"the source runs model version {chunk.model_version}, this "
                            f"worker {incoming.model.info.version}"
                        )
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc) from exc
        blob = b"".join(parts)
        if frame < 0 or len(blob) != total:
            raise Unavailable(f"the state copy was cut short ({len(blob)} of {total} bytes)")
        return frame, blob

    async def _source_head(self, incoming: Incoming) -> int:
        status = await grpc_util.call(
            self._stub(incoming.source_address).GetSessionStatus(
                internal_pb2.GetSessionStatusRequest(session_id=incoming.session_id),
                timeout=RPC_TIMEOUT_S,
            )
        )
        if status.epoch != incoming.source_epoch:
            raise FailedPrecondition(
                f"session {incoming.session_id} moved on at its source (epoch {status.epoch})"
            )
        return int(status.head_frame)

    async def _replay_to(self, incoming: Incoming, frame: int) -> list[StoredEntry]:
        """Replay the incoming state up to ``frame`` under the log (read after the
        source's head was: every entry of a frame before it is in)."""
        rt = self._runtime
        journal = rt.durable()
        entries = await journal.log.read(incoming.session_id)
        state = incoming.state
        assert state is not None
        if frame > state.frame_index:
            await journal.replay(
                incoming.model,
                state,
                controls_by_frame(entries),
                frame,
                incoming.spec.steps,
                rt.engine.in_step_thread,
            )
        return entries

    async def catch_up(
        self, request: internal_pb2.MigrateInRequest
    ) -> internal_pb2.MigrationStatus:
        """Follow the source's log to the cut-over frame exactly, then hold an actor
        there (not stepped until COMMIT)."""
        incoming = self._incoming(request)
        if incoming.expiry is not None:
            incoming.expiry.cancel()  # no time to live while a step runs (its caller's deadline)
        try:
            return await self._catch_up(incoming, request.frame)
        finally:
            if self.incoming.get(incoming.session_id) is incoming:
                self._expire_later(incoming)

    async def _catch_up(self, incoming: Incoming, cutover: int) -> internal_pb2.MigrationStatus:
        rt = self._runtime
        state = incoming.state
        assert state is not None
        if state.frame_index > cutover:
            raise FailedPrecondition(
                f"the copy is at frame {state.frame_index}, past the cut-over {cutover}"
            )
        t0 = time.perf_counter()
        while True:
            head = await self._source_head(incoming)
            if head > cutover:
                raise FailedPrecondition(f"the source made frame {head - 1}, past the cut-over")
            incoming.status.source_head = head
            if head == cutover:
                final = time.perf_counter()
                entries = await self._replay_to(incoming, cutover)
                break
            if head > state.frame_index:
                await self._replay_to(incoming, head)  # what is logged so far, meanwhile
            # the source's next frame (it answers once that one is made and logged)
            await self._source_reached(incoming, min(cutover, max(head, state.frame_index) + 1))
        incoming.status.replay_ms += (time.perf_counter() - t0) * 1000.0
        actor = rt.new_actor(
            incoming.session_id, incoming.spec, incoming.model, state, incoming.epoch
        )
        actor.awaiting_commit = True
        actor.ever_attached = True  # a live session (reclaiming parks it, never closes it)
        await rt.durable().sync_logged(actor, entries)
        incoming.actor = actor
        rt.engine.add(actor)
        incoming.status.frame = actor.next_frame
        incoming.status.final_ms = (time.perf_counter() - final) * 1000.0
        return _copy(incoming.status, incoming.session_id)

    async def _source_reached(self, incoming: Incoming, frame: int) -> None:
        await grpc_util.call(
            self._stub(incoming.source_address).MigrateOut(
                internal_pb2.MigrateOutRequest(
                    op=internal_pb2.MigrateOutRequest.OP_WAIT,
                    session_id=incoming.session_id,
                    epoch=incoming.source_epoch,
                    frame=frame,
                ),
                timeout=RPC_TIMEOUT_S,
            )
        )

    async def commit(self, request: internal_pb2.MigrateInRequest) -> internal_pb2.MigrationStatus:
        held = self._runtime.engine.sessions.get(request.session_id)
        if request.session_id not in self.incoming and held is not None:
            if held.epoch == request.epoch and not held.awaiting_commit:
                # committed already (a stream attached first: ``settle``)
                return internal_pb2.MigrationStatus(
                    session_id=request.session_id, frame=held.next_frame
                )
        incoming = self._incoming(request)
        await self._commit(incoming)
        return _copy(incoming.status, incoming.session_id)

    async def _commit(self, incoming: Incoming) -> None:
        """The placement is here: claim the log at the cut-over (a late append of the
        source is fenced from now on) and make frames."""
        async with incoming.committing:
            await self._commit_once(incoming)

    async def _commit_once(self, incoming: Incoming) -> None:
        rt = self._runtime
        actor = incoming.actor
        if actor is None:
            raise FailedPrecondition(f"session {incoming.session_id} has not caught up here")
        if not actor.awaiting_commit:
            return  # committed already
        journal = rt.durable()
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            entries = await journal.log.read(actor.session_id)
            try:
                await journal.claim(actor, entries)
                await journal.sync_logged(actor, entries)
                break
            except Fenced:
                # the source appended meanwhile (a HEAD entry as its stream detached)
                if attempt == CLAIM_ATTEMPTS:
                    raise
        self._forget(incoming, keep_actor=True)
        actor.awaiting_commit = False
        metrics.get().worker_migrations.add(1, {"direction": "in"})
        actor.due = max(actor.due, time.monotonic())
        rt.engine.wake()
        rt.changed()
        log.info(
            "session %s migrated here at frame %d (epoch %d)",
            actor.session_id,
            actor.next_frame,
            actor.epoch,
            extra={"session_id": actor.session_id},
        )

    async def settle(self, actor: SessionActor) -> None:
        """A stream attaches to ``actor`` before its COMMIT came (the placement moved, and
        the gateway switched at once, or the router died after the transaction): commit
        now if the placement names this worker at its epoch, else wait for the migration
        to end either way (its time to live bounds that)."""
        incoming = self.incoming.get(actor.session_id)
        if incoming is not None and incoming.actor is actor:
            record = await self._placement(actor.session_id)
            here = self._runtime.placed_here(record, actor.epoch)
            if here and self.incoming.get(actor.session_id) is incoming:
                with contextlib.suppress(WindflowError):  # (the router's COMMIT raced it)
                    await self._commit(incoming)
        await actor.wait_committed()

    def abort(self, request: internal_pb2.MigrateInRequest) -> internal_pb2.MigrationStatus:
        incoming = self.incoming.get(request.session_id)
        if incoming is not None and incoming.epoch == request.epoch:
            self._forget(incoming)
        return internal_pb2.MigrationStatus(session_id=request.session_id)

    def _incoming(self, request: internal_pb2.MigrateInRequest) -> Incoming:
        incoming = self.incoming.get(request.session_id)
        if incoming is None or incoming.epoch != request.epoch:
            raise NotFound(
                f"no migration of session {request.session_id} at epoch {request.epoch} here"
            )
        return incoming

    def _forget(self, incoming: Incoming, *, keep_actor: bool = False) -> None:
        if self.incoming.get(incoming.session_id) is incoming:
            del self.incoming[incoming.session_id]
        if incoming.expiry is not None and incoming.expiry is not asyncio.current_task():
            incoming.expiry.cancel()
        actor = incoming.actor
        if actor is not None and not keep_actor:
            if self._runtime.engine.sessions.get(actor.session_id) is actor:
                self._runtime.engine.drop(
                    actor.session_id,
                    Unavailable(f"the migration of session {actor.session_id} was aborted"),
                )
            self._runtime.changed()

    async def _incoming_expires(self, incoming: Incoming, ttl: float) -> None:
        await asyncio.sleep(ttl)
        if self.incoming.get(incoming.session_id) is not incoming:
            return
        record = await self._placement(incoming.session_id)
        if self._runtime.placed_here(record, incoming.epoch) and incoming.actor is not None:
            log.warning(
                "session %s: placed here and never committed; committing", incoming.session_id
            )
            try:
                await self._commit(incoming)
                return
            except WindflowError as err:
                log.error("session %s: commit failed: %s", incoming.session_id, err.message)
        log.warning("session %s: its migration here went quiet; dropped", incoming.session_id)
        self._forget(incoming)

    def _stub(self, address: str) -> internal_pb2_grpc.WorkerStub:
        return internal_pb2_grpc.WorkerStub(self._channels.get(address))

    async def aclose(self) -> None:
        for incoming in list(self.incoming.values()):
            self._forget(incoming)
        for task in self._stops.values():
            task.cancel()
        self._stops.clear()
        await self._channels.aclose()


def _copy(status: internal_pb2.MigrationStatus, session_id: str) -> internal_pb2.MigrationStatus:
    out = internal_pb2.MigrationStatus()
    out.CopyFrom(status)
    out.session_id = session_id
    return out


def _source_status(actor: SessionActor) -> internal_pb2.MigrationStatus:
    """Where a migrating session's source stands: its next frame and durable head."""
    return internal_pb2.MigrationStatus(
        session_id=actor.session_id, frame=actor.next_frame, source_head=actor.durable_head
    )
