"""Plays a schedule's faults on a ``Cluster``, one at a time, each when the clients together
have received its frame count: SIGKILL, SIGSTOP (past the lease) or SIGTERM of the worker
holding a session (SIGTERM drains it: its sessions migrate live), restarts of nats-server
and etcd, and live migrations of a session. A worker that went down comes back after the
fault's ``duration_s``, as a supervisor would bring it back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import grpc

from windflow.chaos.cluster import Cluster
from windflow.chaos.player import Progress
from windflow.chaos.schedule import MOVES, Fault
from windflow.common import grpc_util
from windflow.errors import WindflowError
from windflow.sdk import Client
from windflow.v1 import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 15.0
"""How long a SIGTERMed worker may take to drain and exit before it is killed (its own
drain deadline is shorter: ``cluster.DRAIN_DEADLINE_S``)."""
MIGRATE_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class Injected:
    fault: Fault
    target: str
    """The process it hit."""
    at_s: float
    """Seconds into the schedule."""

    def describe(self) -> str:
        return (
            f"{self.fault.kind} {self.target} at {self.at_s:.1f}s ({self.fault.at_frames} frames)"
        )


class Injector:
    def __init__(
        self, cluster: Cluster, client: Client, session_ids: list[str], progress: Progress
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.session_ids = session_ids
        self.progress = progress
        self.injected: list[Injected] = []
        self.last_end = 0.0
        """``time.monotonic()`` when the last fault ended (0: none yet)."""
        self._t0 = time.monotonic()

    async def run(self, faults: tuple[Fault, ...], clients_done: asyncio.Event) -> None:
        """Each fault in turn once its frame count is reached; those not reached when the
        clients are done are skipped (a fault under way runs to its end)."""
        for fault in faults:
            waits = {
                asyncio.create_task(self.progress.reach(fault.at_frames), name="chaos:reach"),
                asyncio.create_task(clients_done.wait(), name="chaos:clients-done"),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
            if self.progress.frames < fault.at_frames:
                return
            await self.inject(fault)

    async def inject(self, fault: Fault) -> None:
        try:
            await self._inject(fault)
        finally:
            self.last_end = time.monotonic()

    async def _inject(self, fault: Fault) -> None:
        if fault.kind in MOVES:
            await self._migrate(self.session_ids[fault.target], fault)
            return
        if fault.kind in ("restart_nats", "restart_etcd"):
            target = fault.kind.removeprefix("restart_")
        else:
            target = await self._worker_of(self.session_ids[fault.target])
        self.injected.append(Injected(fault, target, time.monotonic() - self._t0))
        log.info("fault: %s on %s (%.2fs)", fault.kind, target, fault.duration_s)
        cluster = self.cluster
        if fault.kind == "stop_worker":
            cluster.signal(target, signal.SIGSTOP)
            try:
                await asyncio.sleep(fault.duration_s)
            finally:
                cluster.signal(target, signal.SIGCONT)
            return
        if fault.kind == "term_worker":
            cluster.signal(target, signal.SIGTERM)
            if not await cluster.wait_exit(target, DRAIN_TIMEOUT_S):
                log.warning(
                    "%s did not exit %.0fs after SIGTERM; killing it", target, DRAIN_TIMEOUT_S
                )
                cluster.signal(target, signal.SIGKILL)
        else:  # kill_worker, or a server: hard (SIGKILL) or graceful (SIGTERM)
            hard = fault.kind == "kill_worker" or fault.hard
            cluster.signal(target, signal.SIGKILL if hard else signal.SIGTERM)
            await cluster.wait_exit(target, DRAIN_TIMEOUT_S)
        await asyncio.sleep(fault.duration_s)
        await cluster.restart(target)

    async def _migrate(self, session_id: str, fault: Fault) -> None:
        """Move the session live to another worker. A refusal (it is detached and its
        worker down, it moves already, no other worker serves it) is part of the game:
        logged, never a violation by itself; what the clients saw is checked as always."""
        source = await self._worker_of(session_id)
        self.injected.append(Injected(fault, source, time.monotonic() - self._t0))
        log.info("fault: migrate_session %s off %s", session_id, source)
        async with grpc_util.channel(self.cluster.addresses["router"]) as channel:
            try:
                moved = await internal_pb2_grpc.RouterStub(channel).Migrate(
                    internal_pb2.MigrateRequest(session_id=session_id, reason="chaos"),
                    timeout=MIGRATE_TIMEOUT_S,
                )
                log.info("migrated %s to %s", session_id, moved.to_worker_id)
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "migration of %s refused: %s %s", session_id, exc.code().name, exc.details()
                )

    async def restore(self) -> None:
        """Bring back every process that is down (a fault cut short)."""
        for name in list(self.cluster.procs):
            if not self.cluster.running(name):
                log.info("restarting %s after the schedule", name)
                await self.cluster.restart(name)

    async def _worker_of(self, session_id: str) -> str:
        """The worker holding the session; the first worker if that cannot be read."""
        try:
            worker = (await self.client.get_session(session_id)).worker_id
        except WindflowError as err:
            log.info("fault target: GetSession %s failed: %s", session_id, err)
            worker = ""
        return worker if worker in self.cluster.workers else self.cluster.workers[0]
