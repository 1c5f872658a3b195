"""The router's side of live migration: it drives each move, one RPC per step
(docs/migration.md), and drains workers with it.

A move of session s from source S (epoch e) to target T:

1. T prepares: a slot, the state copied from S at a frame boundary, the log after it
   replayed, in rounds, while S keeps streaming (``MigrateIn`` PREPARE).
2. S stops before a cut-over frame F a few frames ahead (``MigrateOut`` STOP); T follows
   S's log to exactly F (CATCH_UP).
3. One etcd transaction moves the placement (S, e) -> (T, e + 1, F), on the version read
   at the start: a concurrent move (a crash recovery) makes it fail.
4. T claims the log at F and makes frames (COMMIT); S leaves once its frames before F are
   out (HANDOFF). The gateway switches its leg at F.

A failure before 3 aborts: T drops what it prepared, S goes on (RESUME). After 3 the
session is T's: a failed COMMIT or HANDOFF is finished by the workers' own time-outs, or
by crash recovery. Each step is published on ``windflow.v1.migration.<step>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from services.router.placement import WorkerView, choose_target
from windflow.common import etcd, grpc_util, metrics, names, telemetry
from windflow.errors import FailedPrecondition, NotFound, Unavailable, WindflowError
from windflow.v1 import internal_pb2

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

LEAD_FRAMES = 2
"""Frames the source still makes after it is asked to stop: the target follows its log
meanwhile, so that only the last frame is left to replay once the source made it."""
PREPARE_TIMEOUT_S = 30.0
CATCH_UP_TIMEOUT_S = 5.0
STEP_TIMEOUT_S = 5.0
DRAIN_CONCURRENCY = 2


class Migrator:
    def __init__(self, service: RouterService) -> None:
        self._service = service
        self._moving: set[str] = set()
        """Sessions with a migration under way (a second one is refused)."""
        self._aborted: set[str] = set()
        """Sessions whose migration under way was aborted (for its outcome's count)."""

    async def migrate(self, request: internal_pb2.MigrateRequest) -> internal_pb2.MigrationResult:
        session_id = request.session_id
        if not session_id:
            raise FailedPrecondition("session_id is empty")
        if session_id in self._moving:
            raise FailedPrecondition(f"session {session_id} is already migrating")
        self._moving.add(session_id)
        outcome = "refused"
        try:
            with tracer.start_as_current_span(
                names.SPAN_ROUTER_MIGRATE, attributes={"windflow.session_id": session_id}
            ):
                async with self._service.session_lock(session_id):
                    result = await self._migrate(request)
            outcome = "done"
            return result
        finally:
            if session_id in self._aborted:
                outcome = "aborted"
            self._aborted.discard(session_id)
            self._moving.discard(session_id)
            metrics.get().migrations.add(1, {"outcome": outcome})

    async def _migrate(self, request: internal_pb2.MigrateRequest) -> internal_pb2.MigrationResult:
        service = self._service
        session_id = request.session_id
        key = names.placement_key(session_id)
        kvs = etcd.kv(service.etcd)
        current = await kvs.get(key)
        if not current.kvs:
            raise NotFound(f"session {session_id!r} is not placed (unknown or closed)")
        version = current.kvs[0].version
        record = internal_pb2.PlacementRecord.FromString(current.kvs[0].value)
        if record.parked:
            raise FailedPrecondition(
                f"session {session_id} is parked (on no worker); the next attach restores it"
            )
        source = service.workers.get(record.worker_id)
        if source is None:
            raise Unavailable(
                f"session {session_id}'s worker {record.worker_id} is gone; it is recovering"
            )
        target = choose_target(
            service.workers.values(),
            record.spec.model_id,
            source.worker_id,
            to_worker=request.to_worker_id,
            region=request.region,
            prefer_region=record.spec.region,
        )
        epoch = record.epoch + 1
        result = internal_pb2.MigrationResult(
            session_id=session_id,
            from_worker_id=source.worker_id,
            to_worker_id=target.worker_id,
            region=target.region,
            epoch=epoch,
        )
        detail = f"{source.worker_id} -> {target.worker_id} ({request.reason or 'migrate'})"
        # the slot is taken in the table before the first await (as a placement does)
        service.workers[target.worker_id] = dataclasses.replace(
            target, sessions=target.sessions + 1
        )
        src, dst = service.stub(source), service.stub(target)
        meta = telemetry.inject_metadata()
        t0 = time.perf_counter()
        await self._event("prepare", result, detail)
        stopped = 0.0
        try:
            prepared = await grpc_util.call(
                dst.MigrateIn(
                    internal_pb2.MigrateInRequest(
                        op=internal_pb2.MigrateInRequest.OP_PREPARE,
                        session_id=session_id,
                        spec=record.spec,
                        epoch=epoch,
                        source_address=source.address,
                        source_epoch=record.epoch,
                    ),
                    timeout=PREPARE_TIMEOUT_S,
                    metadata=meta,
                )
            )
            result.snapshot_frame = prepared.snapshot_frame
            result.snapshot_bytes = prepared.snapshot_bytes
            result.rounds = prepared.rounds
            result.prepare_ms = (time.perf_counter() - t0) * 1000.0
            await self._event("ready", result, f"{detail}; {prepared.rounds} rounds")
            stop = await grpc_util.call(
                src.MigrateOut(
                    internal_pb2.MigrateOutRequest(
                        op=internal_pb2.MigrateOutRequest.OP_STOP,
                        session_id=session_id,
                        epoch=record.epoch,
                        lead=LEAD_FRAMES,
                        # its last frames' time, and as long again for the rest
                        stop_ttl_s=2.0 + LEAD_FRAMES / (record.spec.fps or 1.0),
                    ),
                    timeout=STEP_TIMEOUT_S,
                    metadata=meta,
                )
            )
            stopped = time.perf_counter()
            result.cutover_frame = stop.frame
            caught = await grpc_util.call(
                dst.MigrateIn(
                    internal_pb2.MigrateInRequest(
                        op=internal_pb2.MigrateInRequest.OP_CATCH_UP,
                        session_id=session_id,
                        epoch=epoch,
                        frame=stop.frame,
                    ),
                    timeout=CATCH_UP_TIMEOUT_S,
                    metadata=meta,
                )
            )
            caught_at = time.perf_counter()
            moved = internal_pb2.PlacementRecord(
                worker_id=target.worker_id,
                worker_address=target.address,
                epoch=epoch,
                spec=record.spec,
                region=target.region,
                cutover_frame=stop.frame,
                from_worker_id=source.worker_id,
            )
            await service.write_placement(
                key,
                version,
                moved,
                changed=f"session {session_id}'s placement changed during its migration",
            )
        except BaseException as exc:
            await self._abort(result, record.epoch, resume=stopped > 0, why=exc)
            raise
        await self._event("cutover", result, f"{detail} at frame {stop.frame}")
        try:
            await grpc_util.call(
                dst.MigrateIn(
                    internal_pb2.MigrateInRequest(
                        op=internal_pb2.MigrateInRequest.OP_COMMIT,
                        session_id=session_id,
                        epoch=epoch,
                    ),
                    timeout=STEP_TIMEOUT_S,
                    metadata=meta,
                )
            )
        except WindflowError as err:  # its own time-out commits it, or a recovery moves it
            log.error("session %s: commit on %s failed: %s", session_id, target.worker_id, err)
        # the hand-off: from the source's last frame (logged) to the target making frames
        result.handoff_ms = caught.final_ms + (time.perf_counter() - caught_at) * 1000.0
        try:
            await grpc_util.call(
                src.MigrateOut(
                    internal_pb2.MigrateOutRequest(
                        op=internal_pb2.MigrateOutRequest.OP_HANDOFF,
                        session_id=session_id,
                        epoch=record.epoch,
                        to_worker_id=target.worker_id,
                        to_region=target.region,
                    ),
                    timeout=STEP_TIMEOUT_S,
                    metadata=meta,
                )
            )
        except WindflowError as err:  # its placement check drops it
            log.warning("session %s: hand-off on %s failed: %s", session_id, source.worker_id, err)
        result.total_ms = (time.perf_counter() - t0) * 1000.0
        # (the source's session count is left to its own update after the hand-off:
        # lowered here as well, a count that update had lowered already would be one short)
        await self._event("done", result, f"{detail} at frame {stop.frame}")
        log.info(
            "migrated session %s %s at frame %d (prepare %.0f ms, hand-off %.0f ms)",
            session_id,
            detail,
            stop.frame,
            result.prepare_ms,
            result.handoff_ms,
        )
        return result

    async def _abort(
        self,
        result: internal_pb2.MigrationResult,
        source_epoch: int,
        *,
        resume: bool,
        why: BaseException,
    ) -> None:
        """Undo a migration before its transaction: the target drops what it prepared,
        the source (if it was stopped) goes on. Best effort: each side's own time-out
        does the same if it cannot be reached."""
        service = self._service
        session_id = result.session_id
        self._aborted.add(session_id)
        target = service.workers.get(result.to_worker_id)
        if target is not None:
            service.workers[target.worker_id] = dataclasses.replace(
                target, sessions=max(0, target.sessions - 1)
            )
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await service.stub(target).MigrateIn(
                    internal_pb2.MigrateInRequest(
                        op=internal_pb2.MigrateInRequest.OP_ABORT,
                        session_id=session_id,
                        epoch=result.epoch,
                    ),
                    timeout=STEP_TIMEOUT_S,
                )
        source = service.workers.get(result.from_worker_id)
        if resume and source is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await service.stub(source).MigrateOut(
                    internal_pb2.MigrateOutRequest(
                        op=internal_pb2.MigrateOutRequest.OP_RESUME,
                        session_id=session_id,
                        epoch=source_epoch,
                    ),
                    timeout=STEP_TIMEOUT_S,
                )
        reason = why.message if isinstance(why, WindflowError) else repr(why)
        log.warning("migration of session %s aborted: %s", session_id, reason)
        await self._event("aborted", result, reason)

    async def _event(self, step: str, result: internal_pb2.MigrationResult, detail: str) -> None:
        await self._service.bus.publish(
            f"{names.SUBJECT_MIGRATION}.{step}",
            session_id=result.session_id,
            worker_id=result.to_worker_id,
            epoch=result.epoch,
            detail=detail,
        )

    # ---- drains ----

    async def drain(
        self, request: internal_pb2.DrainRequest
    ) -> AsyncIterator[internal_pb2.DrainProgress]:
        """Migrate every session off ``worker_id``, ``concurrency`` at a time, within
        ``deadline_s``; the worker takes no new session meanwhile. Yields a progress
        message at the start, after each session, and at the end (``done``)."""
        service = self._service
        worker_id = request.worker_id
        worker = service.workers.get(worker_id)
        if worker is None:
            raise NotFound(f"no live worker {worker_id!r}")
        await self._set_draining(worker, not request.undo)
        if request.undo:
            yield internal_pb2.DrainProgress(worker_id=worker_id, done=True, detail="undone")
            return
        sessions = await service.placed_on(worker_id)
        progress = internal_pb2.DrainProgress(
            worker_id=worker_id, sessions=len(sessions), remaining=len(sessions)
        )
        yield progress
        queue: asyncio.Queue[internal_pb2.DrainProgress] = asyncio.Queue()
        limit = asyncio.Semaphore(request.concurrency or DRAIN_CONCURRENCY)
        stays: list[str] = []

        async def move(session_id: str) -> None:
            async with limit:
                update = internal_pb2.DrainProgress(worker_id=worker_id)
                try:
                    moved = await self.migrate(
                        internal_pb2.MigrateRequest(session_id=session_id, reason="drain")
                    )
                    update.last.CopyFrom(moved)
                    progress.migrated += 1
                except NotFound:
                    progress.migrated += 1  # closed meanwhile: gone from it all the same
                except WindflowError as err:
                    progress.failed += 1
                    stays.append(f"{session_id}: {err.message}")
                    update.detail = f"session {session_id} stays: {err.message}"
                progress.remaining -= 1
                update.sessions, update.migrated = progress.sessions, progress.migrated
                update.failed, update.remaining = progress.failed, progress.remaining
                await queue.put(update)

        tasks = [asyncio.create_task(move(s), name=f"drain:{s}") for s in sessions]
        deadline = time.monotonic() + (request.deadline_s or float("inf"))
        try:
            for _ in tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    yield await asyncio.wait_for(queue.get(), timeout=min(left, 3600.0))
                except TimeoutError:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        progress.done = True
        progress.detail = (
            "drained"
            if progress.remaining == 0 and not stays
            else "; ".join(
                stays
                + ([f"{progress.remaining} left at the deadline"] if progress.remaining else [])
            )
        )
        yield progress

    async def _set_draining(self, worker: WorkerView, draining: bool) -> None:
        service = self._service
        # in the table at once (the worker's own update follows): nothing new lands there
        service.workers[worker.worker_id] = dataclasses.replace(worker, draining=draining)
        await grpc_util.call(
            service.stub(worker).SetDraining(
                internal_pb2.SetDrainingRequest(draining=draining), timeout=STEP_TIMEOUT_S
            )
        )
