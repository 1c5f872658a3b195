"""Storage retention: what sessions keep of their past, and for how long (docs/access.md).

Checkpoints are what make a fork, a replay or a recovery fast (restore the nearest one at
or before the frame, replay the control log from it); the log alone reaches every frame,
from the seed. So old checkpoints are thinned rather than kept forever (the built-in model
writes about 3.7 KB per frame; a Wan-size snapshot is gigabytes):

- every checkpoint of the recent past (``recent_s`` of the session's frames before its
  head) stays;
- further back, one per ``spacing_s`` of frames in each tier (``TIERS``: one a minute up
  to an hour back, then one every ten minutes);

a session parked for ``parked_retention_s`` is closed, and a closed session's whole state
(its checkpoints, log and record) goes once it has been closed for ``closed_retention_s``.
A checkpoint object a fork still names (forks share their parent's objects) is never
deleted: only this session's catalog entry goes.

``windflow.common.durable.reach`` says, from the checkpoints left, how many frames a fork or
replay at any frame replays at most (``Session.reach``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from etcd3aio import prefix_range_end

from services.session.config import RetentionPolicy
from services.session.orchestrator import Orchestrator
from windflow.common import etcd, metrics, names
from windflow.common.durable import CheckpointStore
from windflow.common.events import EventBus
from windflow.errors import WindflowError
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)


def keep(frames: Sequence[int], head: int, fps: float, policy: RetentionPolicy) -> set[int]:
    """The checkpoint frames to keep of ``frames`` (pure): all in the recent window; in
    each older tier, the oldest in each span of its spacing (stable: thinning again keeps
    the same ones)."""
    spans = [max(1, round(spacing_s * fps)) for _, spacing_s in policy.tiers]
    oldest: list[dict[int, int]] = [{} for _ in spans]  # per tier: span index -> oldest frame
    for frame in frames:
        for tier, span in enumerate(spans):
            bucket = frame // span
            oldest[tier][bucket] = min(frame, oldest[tier].get(bucket, frame))
    kept = set()
    recent = policy.recent_s * fps
    for frame in frames:
        age = head - frame
        if age <= recent:
            kept.add(frame)
            continue
        for tier, (reach_s, _) in enumerate(policy.tiers):
            if age <= reach_s * fps:
                if oldest[tier][frame // spans[tier]] == frame:
                    kept.add(frame)
                break
    return kept


@dataclass(slots=True)
class Scan:
    """The sessions prefix as one range read showed it: what a round decides on."""

    records: list[pb.Session] = field(default_factory=list)
    parked: dict[str, internal_pb2.PlacementRecord] = field(default_factory=dict)
    checkpoints: dict[str, list[pb.Checkpoint]] = field(default_factory=dict)
    """Each session's catalog, oldest first."""
    naming: collections.Counter[str] = field(default_factory=collections.Counter)
    """Catalog entries naming each checkpoint object (a fork's share its parent's)."""

    @classmethod
    def of(cls, items: Iterable[tuple[bytes, bytes]]) -> Scan:
        scan = cls()
        for key, value in items:
            session_id, _, kind = key.decode()[len(names.SESSIONS_PREFIX) :].partition("/")
            if kind == "record":
                scan.records.append(pb.Session.FromString(value))
            elif kind == "placement":
                placement = internal_pb2.PlacementRecord.FromString(value)
                if placement.parked:
                    scan.parked[session_id] = placement
            elif kind.startswith("checkpoints/"):
                checkpoint = pb.Checkpoint.FromString(value)
                scan.checkpoints.setdefault(session_id, []).append(checkpoint)
                scan.naming[checkpoint.object_name] += 1
        for catalog in scan.checkpoints.values():
            catalog.sort(key=lambda c: c.frame_index)
        return scan

    def by_state(self) -> dict[str, int]:
        """Records by state (``placed``, ``streaming``, ``closed`` ...; ``parked`` where the
        placement is parked, whatever the record says)."""
        counts: collections.Counter[str] = collections.Counter()
        for record in self.records:
            parked = record.session_id in self.parked and record.state != pb.SESSION_STATE_CLOSED
            name = "parked" if parked else pb.SessionState.Name(record.state)
            counts[name.removeprefix("SESSION_STATE_").lower()] += 1
        return dict(counts)


class Retention:
    """Thins live sessions' checkpoints, closes sessions parked too long and deletes closed
    sessions' state, a round every ``policy.every_s``, each from one read of the sessions
    prefix. Lifecycle: ``run()`` until cancelled."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        objects: CheckpointStore,
        bus: EventBus,
        policy: RetentionPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._orchestrator = orchestrator
        self._etcd = orchestrator.store.etcd
        self._objects = objects
        self._bus = bus
        self.policy = policy
        self._clock = clock
        self.by_state: dict[str, int] = {}
        """Session records by state ("parked" for a parked placement), as of the last
        round (the metrics ``windflow_session_records`` and ``windflow_sessions_parked``)."""
        m = metrics.get()
        m.session_records.add(lambda: [(n, {"state": s}) for s, n in self.by_state.items()])
        m.sessions_parked.add(lambda: [(self.by_state.get("parked", 0), {})])

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.every_s)
            try:
                thinned, expired, deleted = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention round failed; the next in %.0f s", self.policy.every_s)
                continue
            if thinned or expired or deleted:
                log.info(
                    "retention: %d checkpoints thinned, %d parked sessions closed, %d closed "
                    "sessions deleted",
                    thinned,
                    expired,
                    deleted,
                )

    async def round(self) -> tuple[int, int, int]:
        """(checkpoints thinned, parked sessions closed, closed sessions deleted)."""
        prefix = names.SESSIONS_PREFIX.encode()
        reply = await etcd.kv(self._etcd).get(prefix, prefix_range_end(prefix))
        scan = Scan.of((item.key, item.value) for item in reply.kvs)
        self.by_state = scan.by_state()
        now_ms = self._clock() * 1000
        thinned = expired = deleted = 0
        for session in scan.records:
            session_id = session.session_id
            if session.state == pb.SESSION_STATE_CLOSED:
                closed_for_s = (now_ms - session.closed_unix_ms) / 1000
                if 0 < self.policy.closed_retention_s < closed_for_s and session.closed_unix_ms:
                    await self.delete(session_id, scan)
                    deleted += 1
                continue
            parked = scan.parked.get(session_id)
            parked_for_s = 0.0 if parked is None else (now_ms - parked.parked_unix_ms) / 1000
            if 0 < self.policy.parked_retention_s < parked_for_s:
                await self.expire(session_id)
                expired += 1
                continue
            thinned += await self.thin(session, scan)
        return thinned, expired, deleted

    async def thin(self, session: pb.Session, scan: Scan) -> int:
        checkpoints = scan.checkpoints.get(session.session_id, [])
        frames = [c.frame_index for c in checkpoints]
        head = max([int(session.head_frame), *frames], default=0)
        fps = session.spec.fps or session.model.fps or 1.0
        kept = keep(frames, head, fps, self.policy)
        drop = [c for c in checkpoints if c.frame_index not in kept]
        catalog = self._orchestrator.catalog
        for checkpoint in drop:
            await catalog.forget(session.session_id, checkpoint.frame_index)
        await self._delete_objects(drop, scan)
        return len(drop)

    async def expire(self, session_id: str) -> None:
        """Close a session parked longer than its retention."""
        try:
            await self._orchestrator.close(session_id)
        except WindflowError as err:
            log.warning("parked session %s not closed: %s", session_id, err.message)
            return
        log.info("closed session %s: parked longer than its retention", session_id)
        await self._bus.publish(
            names.SUBJECT_SESSION_RECLAIMED,
            session_id=session_id,
            detail="parked past its retention",
        )

    async def delete(self, session_id: str, scan: Scan) -> None:
        """Everything of a closed session: its checkpoints (the objects no fork names),
        its log, where its clients left it, its record."""
        checkpoints = scan.checkpoints.get(session_id, [])
        await self._orchestrator.catalog.drop_all(session_id)
        await self._delete_objects(checkpoints, scan)
        await self._orchestrator.log.purge(session_id)
        prefix = f"{names.SESSIONS_PREFIX}{session_id}/".encode()
        await etcd.kv(self._etcd).delete(prefix, prefix_range_end(prefix))
        log.info("deleted closed session %s (%d checkpoints)", session_id, len(checkpoints))

    async def _delete_objects(self, dropped: Sequence[pb.Checkpoint], scan: Scan) -> None:
        """Delete the objects of catalog entries just dropped that no other entry names."""
        for checkpoint in dropped:
            scan.naming[checkpoint.object_name] -= 1
            if scan.naming[checkpoint.object_name] <= 0:
                await self._objects.delete(checkpoint.object_name)
