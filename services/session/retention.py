"""Storage retention: what sessions keep of their past, and for how long (docs/access.md).

Checkpoints are what make a fork, a replay or a recovery fast (restore the nearest one at
or before the frame, replay the control log from it); the log alone reaches every frame,
from the seed. So old checkpoints are thinned rather than kept forever (the built-in model
writes about 3.7 KB per frame; a Wan-size snapshot is gigabytes):

- every checkpoint of the recent past (``recent_s`` of the session's frames before its
  head) stays;
- further back, one per ``spacing_s`` of frames in each tier (``TIERS``: one a minute up
  to an hour back, then one every ten minutes);

and a closed session's whole state (its checkpoints, log and record) goes once it has been
closed for ``closed_retention_s``. A checkpoint object a fork still names (forks share
their parent's objects) is never deleted: only this session's catalog entry goes.

``windflow.common.durable.reach`` says, from the checkpoints left, how many frames a fork or
replay at any frame replays at most (``Session.reach``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from etcd3aio import Etcd3Client, prefix_range_end

from services.session.config import RetentionPolicy
from windflow.common import etcd, names
from windflow.common.durable import CheckpointCatalog, CheckpointStore, ControlLog
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


class Retention:
    """Thins live sessions' checkpoints and deletes closed sessions' state, a round every
    ``policy.every_s``. Lifecycle: ``run()`` until cancelled."""

    def __init__(
        self,
        client: Etcd3Client,
        control_log: ControlLog,
        catalog: CheckpointCatalog,
        store: CheckpointStore,
        policy: RetentionPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._etcd = client
        self._log = control_log
        self._catalog = catalog
        self._store = store
        self.policy = policy
        self._clock = clock

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.every_s)
            try:
                thinned, deleted = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention round failed; the next in %.0f s", self.policy.every_s)
                continue
            if thinned or deleted:
                log.info(
                    "retention: %d checkpoints thinned, %d closed sessions deleted",
                    thinned,
                    deleted,
                )

    async def round(self) -> tuple[int, int]:
        """(checkpoints thinned, closed sessions deleted)."""
        prefix = names.SESSIONS_PREFIX.encode()
        reply = await etcd.kv(self._etcd).get(prefix, prefix_range_end(prefix))
        records = [
            pb.Session.FromString(item.value) for item in reply.kvs if item.key.endswith(b"/record")
        ]
        thinned = deleted = 0
        horizon_ms = (self._clock() - self.policy.closed_retention_s) * 1000
        for session in records:
            if session.state == pb.SESSION_STATE_CLOSED:
                if (
                    self.policy.closed_retention_s > 0
                    and session.closed_unix_ms
                    and session.closed_unix_ms < horizon_ms
                ):
                    await self.delete(session.session_id)
                    deleted += 1
                continue
            thinned += await self.thin(session)
        return thinned, deleted

    async def thin(self, session: pb.Session) -> int:
        checkpoints = await self._catalog.list(session.session_id)
        frames = [c.frame_index for c in checkpoints]
        head = max([int(session.head_frame), *frames], default=0)
        fps = session.spec.fps or session.model.fps or 1.0
        kept = keep(frames, head, fps, self.policy)
        drop = [c for c in checkpoints if c.frame_index not in kept]
        if not drop:
            return 0
        for checkpoint in drop:
            await self._catalog.forget(session.session_id, checkpoint.frame_index)
        await self._delete_objects([c.object_name for c in drop])
        return len(drop)

    async def delete(self, session_id: str) -> None:
        """Everything of a closed session: its checkpoints (the objects no fork names),
        its log, where its clients left it, its record."""
        checkpoints = await self._catalog.list(session_id)
        await self._catalog.drop_all(session_id)
        await self._delete_objects([c.object_name for c in checkpoints])
        await self._log.purge(session_id)
        prefix = f"{names.SESSIONS_PREFIX}{session_id}/".encode()
        await etcd.kv(self._etcd).delete(prefix, prefix_range_end(prefix))
        log.info("deleted closed session %s (%d checkpoints)", session_id, len(checkpoints))

    async def _delete_objects(self, object_names: list[str]) -> None:
        shared = await self._catalog.referenced(object_names)
        for name in object_names:
            if name not in shared:
                await self._store.delete(name)
