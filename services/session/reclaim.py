"""Reclaiming abandoned sessions, so that no client can hold the mesh's slots by leaving.

Every ``every_s`` the reclaimer asks each live worker for its sessions' idle times
(``Worker.ListSessions``: one call per worker) and, each rule on its own limit (0 turns it
off):

- a session no client ever attached to within ``unattached_s`` is closed;
- a session without a client for ``park_after_s`` is *parked*: its worker checkpoints it at
  its head and lets it go (``Worker.ParkSession``: the slot is free), then its placement
  is marked parked at epoch + 1 (fencing that worker). The next attach, through any
  gateway, asks the router to recover it: a restore of that checkpoint wherever there is
  room, at the next frame, bit for bit (docs/access.md);

(A session parked for too long is closed by the retention round: ``retention.py``.)

Every step is conditional on what was read: the worker refuses a session that was
attached meanwhile (FAILED_PRECONDITION) and each placement write compares the key's
version, so a client that comes back at the last moment wins over the reclaimer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.session.config import ReclaimPolicy
from services.session.orchestrator import Orchestrator
from windflow.common import etcd, grpc_util, metrics, names
from windflow.common.events import EventBus
from windflow.errors import FailedPrecondition, NotFound, Unavailable, WindflowError
from windflow.v1 import internal_pb2

log = logging.getLogger(__name__)

CONCURRENCY = 8
"""Sessions reclaimed at once (a park snapshots and uploads one session's state)."""


@dataclass(slots=True)
class ReclaimRound:
    closed: list[str] = field(default_factory=list)
    """Never attached within the limit."""
    parked: list[str] = field(default_factory=list)


def verdict(status: internal_pb2.SessionStatus, policy: ReclaimPolicy) -> str | None:
    """What to do with a session a worker holds: "close", "park" or None (pure)."""
    if status.attached:
        return None
    if not status.ever_attached:
        if policy.unattached_s > 0 and status.idle_s >= policy.unattached_s:
            return "close"
        return None
    if policy.park_after_s > 0 and status.idle_s >= policy.park_after_s:
        return "park"
    return None


class Reclaimer:
    def __init__(
        self,
        orchestrator: Orchestrator,
        bus: EventBus,
        policy: ReclaimPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._orchestrator = orchestrator
        self._etcd = orchestrator.store.etcd
        self._bus = bus
        self.policy = policy
        self._clock = clock
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self.total = ReclaimRound()
        """Everything reclaimed since start (for logs and tests)."""
        for action in ("closed", "parked"):  # (every series shows from the start)
            metrics.get().sessions_reclaimed.add(0, {"action": action})

    async def run(self) -> None:
        log.info(
            "reclaiming: close never attached after %.0f s, park detached after %.0f s (0: never)",
            self.policy.unattached_s,
            self.policy.park_after_s,
        )
        while True:
            await asyncio.sleep(self.policy.every_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reclaim round failed; the next one in %.1f s", self.policy.every_s)

    async def round(self) -> ReclaimRound:
        done = ReclaimRound()
        workers = await etcd.list_workers(self._etcd)
        await asyncio.gather(*(self._worker_round(w, done) for w in workers))
        for mine, total in (
            (done.closed, self.total.closed),
            (done.parked, self.total.parked),
        ):
            total.extend(mine)
        return done

    async def _worker_round(self, worker: internal_pb2.WorkerInfo, done: ReclaimRound) -> None:
        try:
            listed = await grpc_util.call(
                self._orchestrator.worker(worker.address).ListSessions(
                    internal_pb2.ListSessionsRequest(), timeout=5.0
                )
            )
        except WindflowError as err:
            log.debug("worker %s did not list its sessions: %s", worker.worker_id, err.message)
            return
        work = []
        for status in listed.sessions:
            action = verdict(status, self.policy)
            if action == "close":
                work.append(self._close_unattached(status, done))
            elif action == "park":
                work.append(self._park(worker, status, done))
        await asyncio.gather(*work)

    async def _close_unattached(
        self, status: internal_pb2.SessionStatus, done: ReclaimRound
    ) -> None:
        async with self._limit:
            try:
                await self._orchestrator.close(
                    status.session_id, if_idle_s=self.policy.unattached_s, epoch=status.epoch
                )
            except (FailedPrecondition, NotFound, Unavailable) as err:
                log.info("session %s not reclaimed: %s", status.session_id, err.message)
                return
        done.closed.append(status.session_id)
        metrics.get().sessions_reclaimed.add(1, {"action": "closed"})
        log.info(
            "closed session %s: no client attached within %.0f s",
            status.session_id,
            self.policy.unattached_s,
        )
        await self._publish(status.session_id, f"never attached within {status.idle_s:.0f} s")

    async def _park(
        self,
        worker: internal_pb2.WorkerInfo,
        status: internal_pb2.SessionStatus,
        done: ReclaimRound,
    ) -> None:
        session_id = status.session_id
        kvs = etcd.kv(self._etcd)
        key = names.placement_key(session_id)
        async with self._limit:
            current = await kvs.get(key)
            if not current.kvs:
                return
            record = internal_pb2.PlacementRecord.FromString(current.kvs[0].value)
            if (record.worker_id, record.epoch) != (worker.worker_id, status.epoch):
                return  # moved since the worker listed it
            t0 = time.perf_counter()
            try:
                parked = await grpc_util.call(
                    self._orchestrator.worker(worker.address).ParkSession(
                        internal_pb2.ParkSessionRequest(
                            session_id=session_id,
                            epoch=status.epoch,
                            min_idle_s=self.policy.park_after_s,
                        ),
                        timeout=30.0,
                    )
                )
            except WindflowError as err:
                log.info("session %s not parked: %s", session_id, err.message)
                return
            mark = internal_pb2.PlacementRecord(
                epoch=record.epoch + 1,
                spec=record.spec,
                region=record.region,
                parked=True,
                parked_head=parked.head_frame,
                parked_unix_ms=int(self._clock() * 1000),
            )
            swapped = await kvs.txn(
                compare=[kvs.txn_compare_version(key, current.kvs[0].version)],
                success=[kvs.txn_op_put(key, mark.SerializeToString())],
            )
        took_ms = (time.perf_counter() - t0) * 1000
        if not swapped.succeeded:
            # an attach came back meanwhile and the router restored it: it lives there
            log.info("session %s moved while it was parked; it stays where it went", session_id)
            return
        done.parked.append(session_id)
        metrics.get().sessions_reclaimed.add(1, {"action": "parked"})
        log.info(
            "parked session %s at frame %d in %.1f ms: no client for %.0f s (worker %s "
            "freed a slot)",
            session_id,
            parked.head_frame,
            took_ms,
            parked.idle_s,
            worker.worker_id,
        )
        await self._bus.publish(
            names.SUBJECT_SESSION_PARKED,
            session_id=session_id,
            worker_id=worker.worker_id,
            epoch=mark.epoch,
            model_id=record.spec.model_id,
            detail=f"at frame {parked.head_frame}",
        )

    async def _publish(self, session_id: str, detail: str) -> None:
        await self._bus.publish(
            names.SUBJECT_SESSION_RECLAIMED, session_id=session_id, detail=detail
        )
