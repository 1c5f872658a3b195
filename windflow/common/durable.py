"""The durable side of a session, outside any worker: its control log and checkpoints.

- ``ControlLog``: JetStream stream ``WINDFLOW_LOG``, one subject per session
  (``windflow.v1.log.<session_id>``). Every append is acknowledged by the server; appends
  carry the expected last sequence of the subject, so a worker that lost the session to
  another (which appended a CLAIM entry) is fenced off: its next append fails.
- ``CheckpointStore``: snapshot bytes in the JetStream object store (it chunks blobs; core
  NATS messages are limited to 1 MB).
- ``CheckpointCatalog``: one etcd key per checkpoint under the session's keyspace
  (``/windflow/v1/sessions/<id>/checkpoints/<frame>``), written by the worker that took it
  under a placement-epoch fence, read and pruned by the session service.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import nats.js.errors
from etcd3aio import Etcd3Client, prefix_range_end
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, Header, StorageType
from nats.js.object_store import ObjectStore

from windflow.common import env, etcd, faults, names
from windflow.errors import (
    DataLoss,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

LOG_STREAM = "WINDFLOW_LOG"
LOG_SUBJECTS = f"{names.SUBJECT_PREFIX}.log.>"
CHECKPOINT_BUCKET = "windflow-checkpoints"
INPUT_BUCKET = "windflow-inputs"
_WRONG_LAST_SEQUENCE = 10071


def log_subject(session_id: str) -> str:
    return f"{names.SUBJECT_PREFIX}.log.{session_id}"


class Fenced(FailedPrecondition):
    """Another worker claimed the session: this one must stop writing its log."""


@dataclass(frozen=True, slots=True)
class StoredEntry:
    seq: int
    entry: internal_pb2.LogEntry


LOG_MAX_ENTRIES_PER_SESSION = 1_000_000
"""A session's log holds at most this many entries (one per control or quality change,
plus a CLAIM per recovery and a HEAD per detach: at one change per frame, 11.5 hours at
24 fps); an append beyond it is refused RESOURCE_EXHAUSTED, never silently dropped."""
LOG_MAX_BYTES = 4 << 30
"""The whole log stream's bound on disk; appends beyond it are refused likewise."""
LOG_DUPLICATE_WINDOW_S = 120.0
"""How long the server remembers an append's Nats-Msg-Id (a retried append within it)."""
_STORE_LIMIT = 10077  # JetStream: "maximum messages per subject exceeded", "maximum bytes ..."


def stream_replicas() -> int:
    """Replicas of the streams and buckets this process creates
    (``WINDFLOW_JETSTREAM_REPLICAS``); ValueError names the variable when it is bad."""
    raw = env.JETSTREAM_REPLICAS.get("1") or "1"
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= 5:
        raise ValueError(f"{env.JETSTREAM_REPLICAS.name}={raw!r}: expected 1..5 replicas")
    return count


class ControlLog:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def ensure(
        self,
        *,
        max_entries_per_session: int = LOG_MAX_ENTRIES_PER_SESSION,
        max_bytes: int = LOG_MAX_BYTES,
    ) -> None:
        """Create the stream if it does not exist (idempotent), with its bounds: entries
        per session, bytes in all, both refusing new entries rather than deleting old ones
        (a log that lost its start could not be replayed)."""
        try:
            await self._js.stream_info(LOG_STREAM)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.add_stream(
                    name=LOG_STREAM,
                    subjects=[LOG_SUBJECTS],
                    storage=StorageType.FILE,
                    max_msgs_per_subject=max_entries_per_session,
                    max_bytes=max_bytes,
                    discard=DiscardPolicy.NEW,
                    discard_new_per_subject=True,
                    duplicate_window=LOG_DUPLICATE_WINDOW_S,
                    num_replicas=stream_replicas(),
                )
            except nats.js.errors.BadRequestError:
                await self._js.stream_info(LOG_STREAM)  # created concurrently

    async def append(
        self,
        session_id: str,
        entry: internal_pb2.LogEntry,
        expect_seq: int,
        msg_id: str = "",
    ) -> int:
        """Append after the entry with stream sequence ``expect_seq`` (0: the log is empty).

        Returns the new entry's sequence; raises ``Fenced`` if the log moved on without us
        and ``Unavailable`` for any other failure, whatever the client raised (so a retry
        is the caller's choice). ``msg_id`` (``Nats-Msg-Id``) makes a retry idempotent:
        when the first try landed and only its ack was lost, the retry finds the subject's
        last entry is that try (the server checks the expected sequence before its
        de-duplication, so it answers "wrong last sequence") and returns its sequence.
        """
        headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(expect_seq)}
        if msg_id:
            headers[Header.MSG_ID.value] = msg_id
        try:
            faults.hit("log.append")
            if entry.kind == internal_pb2.LogEntry.KIND_HEAD:
                faults.hit("log.head")
            ack = await self._js.publish(
                log_subject(session_id), entry.SerializeToString(), headers=headers
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                landed = await self._landed(session_id, msg_id) if msg_id else 0
                if landed:
                    return landed
                raise Fenced(f"the control log of session {session_id} has a new owner") from exc
            if exc.err_code == _STORE_LIMIT and "maximum" in (exc.description or ""):
                raise ResourceExhausted(
                    f"the control log of session {session_id} is full ({exc.description})"
                ) from exc
            raise Unavailable(f"control log append failed: {exc}") from exc
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            # no responders, a closed or reconnecting connection, a full outbound buffer,
            # a timeout: the entry may or may not have landed; msg_id settles a retry
            raise Unavailable(
                f"control log append failed: {type(exc).__name__}: {exc}".rstrip(": ")
            ) from exc
        return int(ack.seq)

    async def _landed(self, session_id: str, msg_id: str) -> int:
        """The sequence of the subject's last entry if it carries ``msg_id``, else 0."""
        try:
            last = await self._js.get_last_msg(LOG_STREAM, log_subject(session_id))
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"control log append unresolved: {exc}") from exc
        if (last.headers or {}).get(Header.MSG_ID.value) == msg_id:
            return int(last.seq or 0)
        return 0

    async def read(self, session_id: str) -> list[StoredEntry]:
        """Every entry of the session's log, in order (one ordered consumer, not a round
        trip per entry)."""
        faults.hit("log.read")
        if await self.length(session_id) == 0:
            return []
        sub = await self._js.subscribe(
            log_subject(session_id),
            stream=LOG_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        entries: list[StoredEntry] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=5.0)
                meta = msg.metadata
                entries.append(
                    StoredEntry(meta.sequence.stream, internal_pb2.LogEntry.FromString(msg.data))
                )
                if meta.num_pending == 0:
                    return entries
        except nats.errors.TimeoutError as exc:
            raise Unavailable(f"reading the control log of {session_id} timed out") from exc
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def truncate(self, session_id: str, stored: Sequence[StoredEntry], frame: int) -> int:
        """Delete the control and head entries for frames >= ``frame`` (of ``stored``, as
        read): that future was abandoned. CLAIM entries stay (they are the fence). Returns
        how many went."""
        gone = 0
        claim = internal_pb2.LogEntry.KIND_CLAIM
        for item in stored:
            if item.entry.kind != claim and item.entry.frame_index >= frame:
                try:
                    await self._js.delete_msg(LOG_STREAM, item.seq)
                except nats.js.errors.NotFoundError:
                    pass  # deleted already (a truncation before this one)
                except (nats.errors.Error, TimeoutError) as exc:
                    raise Unavailable(f"truncating the control log of {session_id}: {exc}") from exc
                gone += 1
        return gone

    async def copy(self, source: str, target: str, before_frame: int) -> int:
        """Write ``source``'s control entries for frames < ``before_frame`` as ``target``'s
        log (which must be empty). Returns the number of entries copied."""
        return await self.copy_many(source, [target], before_frame)

    async def copy_many(self, source: str, targets: Sequence[str], before_frame: int) -> int:
        """``copy`` to each of ``targets``, reading ``source`` once and waiting for every
        write at once. Returns the number of entries each got."""
        entries = [
            item.entry.SerializeToString()
            for item in await self.read(source)
            if item.entry.kind == internal_pb2.LogEntry.KIND_CONTROL
            and item.entry.frame_index < before_frame
        ]
        for target in targets:
            subject = log_subject(target)
            for entry in entries:  # pipelined; the server keeps their order
                await self._js.publish_async(subject, entry)
        await self._js.publish_async_completed()
        return len(entries)

    async def purge(self, session_id: str) -> None:
        """Delete the session's whole log (a closed session past its retention)."""
        try:
            await self._js.purge_stream(LOG_STREAM, subject=log_subject(session_id))
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"purging the control log of {session_id}: {exc}") from exc

    async def length(self, session_id: str) -> int:
        info = await self._js.stream_info(LOG_STREAM, subjects_filter=log_subject(session_id))
        subjects = info.state.subjects or {}
        return int(subjects.get(log_subject(session_id), 0))


def log_head(entries: Sequence[StoredEntry], checkpoint_frames: Sequence[int] = ()) -> int:
    """The head a session's durable state records: the frames made are at least those
    before its newest HEAD mark (written when its stream detached), its newest control or
    CLAIM entry (the frame it stamps was made or resumed at) and its newest checkpoint.
    A crash while attached may have made frames after all of these under the control in
    effect; a client that saw them resumes past this head, and replay makes them again."""
    head = max(checkpoint_frames, default=0)
    for item in entries:
        entry = item.entry
        if entry.kind == internal_pb2.LogEntry.KIND_CONTROL:
            head = max(head, entry.frame_index + 1)
        else:
            head = max(head, entry.frame_index)
    return head


def reach(checkpoints: Sequence[int], head: int, frame_ms: float = 0.0) -> list[pb.Reach]:
    """For frames [0, head]: ranges with the most frames a fork or replay in them replays
    (from the nearest checkpoint at or before, or the seed)."""
    starts = sorted({0, *(c for c in checkpoints if 0 < c <= head)})
    out: list[pb.Reach] = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else head + 1
        worst = end - 1 - start
        if out and out[-1].max_replay_frames == worst and out[-1].to_frame == start:
            out[-1].to_frame = end
            continue
        out.append(
            pb.Reach(
                from_frame=start,
                to_frame=end,
                max_replay_frames=worst,
                max_replay_ms=worst * frame_ms,
            )
        )
    return out


def controls_by_frame(entries: Sequence[StoredEntry]) -> list[internal_pb2.LogEntry]:
    """The control entries, ordered by frame (CLAIM entries are bookkeeping, not input)."""
    out = [s.entry for s in entries if s.entry.kind == internal_pb2.LogEntry.KIND_CONTROL]
    out.sort(key=lambda e: e.frame_index)
    return out


class _Bucket:
    """A JetStream object store bucket, created on first use."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        self._js = js
        self._name = name
        self._store: ObjectStore | None = None
        self._lock = asyncio.Lock()

    async def _bucket(self) -> ObjectStore:
        async with self._lock:
            if self._store is None:
                try:
                    self._store = await self._js.object_store(self._name)
                except nats.js.errors.BucketNotFoundError:
                    self._store = await self._js.create_object_store(
                        self._name, storage=StorageType.FILE, replicas=stream_replicas()
                    )
            return self._store


class CheckpointStore(_Bucket):
    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, CHECKPOINT_BUCKET)

    @staticmethod
    def object_name(session_id: str, frame_index: int) -> str:
        return f"{session_id}.{frame_index:012d}"

    async def put(self, name: str, data: bytes) -> None:
        faults.hit("checkpoint.put")
        await (await self._bucket()).put(name, data)

    async def delete(self, name: str) -> None:
        """Delete an object (gone already: nothing to do)."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await (await self._bucket()).delete(name)

    async def get(self, name: str) -> bytes:
        try:
            result = await (await self._bucket()).get(name)
        except nats.js.errors.NotFoundError as exc:  # never stored, or deleted
            raise NotFound(f"checkpoint object {name!r} is missing") from exc
        return bytes(result.data or b"")


class InputStore(_Bucket):
    """Input frames (``Control.frame``) by digest, raw RGB: the control log names them
    (``LogEntry.input_digest``) and replays read them back. An object is written once
    (content-addressed: a fork's log names its parent's, a re-sent frame is one object)
    and kept; a bounded cache in memory serves replays and restores."""

    CACHE_BYTES = 64 << 20

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, INPUT_BUCKET)
        self._stored: dict[str, asyncio.Task[None]] = {}
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._cache_bytes = 0

    @staticmethod
    def object_name(digest: str) -> str:
        return f"input.{digest}"

    def stage(self, digest: str, data: bytes) -> None:
        """Start storing ``data`` under ``digest`` (once per digest per process; a failed
        put is tried again by the next ``stage`` or ``stored``)."""
        self._remember(digest, data)
        task = self._stored.get(digest)
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            self._stored[digest] = asyncio.create_task(
                self._put(digest, data), name=f"input-put:{digest[:12]}"
            )

    async def stored(self, digest: str) -> None:
        """Return once ``digest`` is in the bucket (raises ``Unavailable`` when its put
        failed: staged again, it is retried)."""
        task = self._stored.get(digest)
        if task is None:
            return  # not staged here: read from the log, so stored before
        try:
            await asyncio.shield(task)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
            data = self._cache.get(digest)
            if data is not None:
                del self._stored[digest]
                self.stage(digest, data)
            raise Unavailable(f"storing input frame {digest[:12]} failed: {exc}") from exc

    async def _put(self, digest: str, data: bytes) -> None:
        faults.hit("input.put")
        bucket = await self._bucket()
        name = self.object_name(digest)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            if (await bucket.get_info(name)).size == len(data):
                return
        await bucket.put(name, data)

    async def get(self, digest: str) -> bytes:
        """The raw RGB bytes of input frame ``digest``; ``DataLoss`` when it is missing."""
        data = self._cache.get(digest)
        if data is not None:
            self._cache.move_to_end(digest)
            return data
        try:
            result = await (await self._bucket()).get(self.object_name(digest))
        except nats.js.errors.NotFoundError as exc:
            raise DataLoss(
                f"input frame {digest[:12]} named by the control log is missing"
            ) from exc
        data = bytes(result.data or b"")
        self._remember(digest, data)
        return data

    def _remember(self, digest: str, data: bytes) -> None:
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return
        self._cache[digest] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > self.CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)


class CheckpointCatalog:
    def __init__(self, client: Etcd3Client) -> None:
        self._etcd = client

    @staticmethod
    def _prefix(session_id: str) -> str:
        return f"{names.SESSIONS_PREFIX}{session_id}/checkpoints/"

    async def add(self, session_id: str, checkpoint: pb.Checkpoint, *, epoch: int) -> bool:
        """Record ``checkpoint`` if ``epoch`` is still the session's placement epoch."""
        kv = etcd.kv(self._etcd)
        key = names.placement_key(session_id)
        current = await kv.get(key)
        if not current.kvs:
            return False
        placement = internal_pb2.PlacementRecord.FromString(current.kvs[0].value)
        if placement.epoch != epoch:
            return False
        checkpoint.created_unix_ms = checkpoint.created_unix_ms or int(time.time() * 1000)
        done = await kv.txn(
            compare=[kv.txn_compare_value(key, current.kvs[0].value)],
            success=[
                kv.txn_op_put(
                    f"{self._prefix(session_id)}{checkpoint.frame_index:012d}",
                    checkpoint.SerializeToString(),
                )
            ],
        )
        return bool(done.succeeded)

    async def put(self, session_id: str, checkpoint: pb.Checkpoint) -> None:
        """Unfenced write, for the session service (e.g. a fork inherits its parent's)."""
        await etcd.kv(self._etcd).put(
            f"{self._prefix(session_id)}{checkpoint.frame_index:012d}",
            checkpoint.SerializeToString(),
        )

    async def list(self, session_id: str) -> list[pb.Checkpoint]:
        """Oldest first."""
        prefix = self._prefix(session_id).encode()
        response = await etcd.kv(self._etcd).get(prefix, prefix_range_end(prefix))
        out = [pb.Checkpoint.FromString(item.value) for item in response.kvs]
        out.sort(key=lambda c: c.frame_index)
        return out

    async def drop_after(self, session_id: str, frame: int) -> Sequence[pb.Checkpoint]:
        """Forget checkpoints of frames > ``frame`` (a rewind made them another future);
        returns them."""
        dropped = [c for c in await self.list(session_id) if c.frame_index > frame]
        for checkpoint in dropped:
            await etcd.kv(self._etcd).delete(
                f"{self._prefix(session_id)}{checkpoint.frame_index:012d}"
            )
        return dropped

    async def referenced(self, object_names: Sequence[str]) -> set[str]:
        """Which of ``object_names`` some session's catalog still names (a fork shares
        its parent's checkpoint objects)."""
        wanted = set(object_names)
        if not wanted:
            return set()
        prefix = names.SESSIONS_PREFIX.encode()
        response = await etcd.kv(self._etcd).get(prefix, prefix_range_end(prefix))
        found = set()
        for item in response.kvs:
            if b"/checkpoints/" in item.key:
                name = pb.Checkpoint.FromString(item.value).object_name
                if name in wanted:
                    found.add(name)
        return found

    async def forget(self, session_id: str, frame: int) -> None:
        """Drop one checkpoint from the catalog (retention thinning); its object stays."""
        await etcd.kv(self._etcd).delete(f"{self._prefix(session_id)}{frame:012d}")

    async def drop_all(self, session_id: str) -> None:
        prefix = self._prefix(session_id).encode()
        await etcd.kv(self._etcd).delete(prefix, prefix_range_end(prefix))


class DeliveredHeads:
    """Where each session's clients left it: ``/windflow/v1/sessions/<id>/delivered`` holds
    the frame after the last one a client received, written by the gateway when a stream
    ends. A worker records the same in the session's log (a HEAD entry) once the detached
    session's frames settle; this copy, from another process, is there when the worker
    dies before that entry lands. A re-placement with no client restores the session at
    the later of the two (``Journal.restore``). A rewind lowers it (``cap``)."""

    def __init__(self, client: Etcd3Client) -> None:
        self._etcd = client

    async def record(self, session_id: str, frame: int) -> None:
        await etcd.kv(self._etcd).put(names.delivered_key(session_id), str(frame))

    async def get(self, session_id: str) -> int:
        """The recorded frame; 0 when none."""
        response = await etcd.kv(self._etcd).get(names.delivered_key(session_id))
        return int(response.kvs[0].value) if response.kvs else 0

    async def cap(self, session_id: str, frame: int) -> None:
        """No later than ``frame`` (the future after it was abandoned)."""
        if await self.get(session_id) > frame:
            await self.record(session_id, frame)
