"""Per-second usage metering: what workers publish, and the ledger that bills it.

Workers meter the frames they send of each session, second by second of the session's own
frame clock (second s = frames [s * fps, (s + 1) * fps), fps rounded up): one
``UsageRecord`` per second streamed, or per part of one where a stream ends mid-second,
published to the JetStream stream WINDFLOW_USAGE with ``Nats-Msg-Id`` = session, second
and frame range, so a retried publish is stored once.

The ledger (the session service runs it: ``Ledger.run``) consumes the stream with a
durable consumer and keeps, per session, the union of the frame ranges billed: a
recovery's or a migration's overlap, or a record delivered twice, never bills a frame
twice. Each record is applied in one etcd transaction with the consumer's cursor (the
stream sequence of the last record applied), so a redelivery after a crash is skipped.
Billed seconds = frames billed / the session's fps. Frames re-made after a rewind are not
billed again: the ledger bills each frame index of a session once.

Keys (etcd): ``/windflow/v1/usage/sessions/<id>``, ``.../tenants/<tenant>``,
``.../tokens/<jti>`` (the budget check reads this one), ``.../cursor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from etcd3aio import Etcd3Client, prefix_range_end
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from windflow.common import etcd, metrics, names
from windflow.common.durable import stream_replicas
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)

USAGE_STREAM = "WINDFLOW_USAGE"
USAGE_SUBJECTS = f"{names.SUBJECT_PREFIX}.usage.>"
USAGE_DUPLICATE_WINDOW_S = 600.0
"""How long JetStream remembers a record's id (a retry within it is stored once; the
ledger's frame union covers any later overlap)."""
LEDGER_CONSUMER = "usage-ledger"
USAGE_PREFIX = f"{names.ETCD_PREFIX}/usage/"
CURSOR_KEY = f"{USAGE_PREFIX}cursor"


def usage_subject(session_id: str) -> str:
    return f"{names.SUBJECT_PREFIX}.usage.{session_id}"


def session_key(session_id: str) -> str:
    return f"{USAGE_PREFIX}sessions/{session_id}"


def tenant_key(tenant: str) -> str:
    return f"{USAGE_PREFIX}tenants/{tenant}"


def token_key(token_id: str) -> str:
    return f"{USAGE_PREFIX}tokens/{token_id}"


def frames_per_second(fps: float) -> int:
    """The frames in one second of a session's frame clock (its fps, rounded up)."""
    return max(1, math.ceil(fps - 1e-6))


def record_id(record: internal_pb2.UsageRecord) -> str:
    """The record's ``Nats-Msg-Id``: the same frames of the same second, the same id."""
    return f"{record.session_id}.{record.second}.{record.first_frame}.{record.end_frame}"


# ---- the frame ranges billed: pure ----


def add_range(ranges: list[tuple[int, int]], lo: int, hi: int) -> tuple[list[tuple[int, int]], int]:
    """Merge [lo, hi) into sorted, disjoint ``ranges``; the new ranges and how many of its
    frames were not in them yet."""
    if hi <= lo:
        return ranges, 0
    merged: list[tuple[int, int]] = []
    overlap = 0
    new_lo, new_hi = lo, hi
    for a, b in ranges:
        if b < new_lo or a > new_hi:  # disjoint and not touching
            merged.append((a, b))
            continue
        overlap += max(0, min(b, hi) - max(a, lo))
        new_lo, new_hi = min(a, new_lo), max(b, new_hi)
    merged.append((new_lo, new_hi))
    merged.sort()
    return merged, (hi - lo) - overlap


# ---- the ledger's documents ----


class SessionUsage(msgspec.Struct, kw_only=True):
    session_id: str
    tenant: str = ""
    model_id: str = ""
    fps: int = 1
    frames: int = 0
    """Distinct frames billed."""
    ranges: list[tuple[int, int]] = msgspec.field(default_factory=list)
    steps: int = 0
    bytes_out: int = 0
    compute_ms: float = 0.0
    minutes: dict[int, int] = msgspec.field(default_factory=dict)
    """Frames billed by the unix minute their record was made in (``--since``)."""
    tokens: dict[str, int] = msgspec.field(default_factory=dict)
    """Frames billed under each token (jti)."""
    first_unix_ms: int = 0
    last_unix_ms: int = 0

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def seconds_since(self, since_unix_ms: int) -> float:
        minute = since_unix_ms // 60_000
        return sum(n for m, n in self.minutes.items() if m >= minute) / self.fps


class TotalUsage(msgspec.Struct, kw_only=True):
    """A tenant's or a token's billed streaming seconds."""

    name: str
    seconds: float = 0.0
    frames: int = 0
    last_unix_ms: int = 0


_session_codec = msgspec.json.Decoder(SessionUsage)
_total_codec = msgspec.json.Decoder(TotalUsage)


def apply(usage: SessionUsage | None, record: internal_pb2.UsageRecord) -> tuple[SessionUsage, int]:
    """``record`` applied to a session's usage (pure): the new usage and the frames it
    added (0 for frames billed already)."""
    if usage is None:
        usage = SessionUsage(
            session_id=record.session_id,
            tenant=record.tenant,
            model_id=record.model_id,
            fps=max(1, record.frames_per_second),
            first_unix_ms=record.unix_ms,
        )
    usage.ranges, added = add_range(usage.ranges, record.first_frame, record.end_frame)
    if added:
        share = added / max(1, record.end_frame - record.first_frame)
        usage.frames += added
        usage.steps += round(record.steps * share)
        usage.bytes_out += round(record.bytes_out * share)
        usage.compute_ms += record.compute_ms * share
        minute = record.unix_ms // 60_000
        usage.minutes[minute] = usage.minutes.get(minute, 0) + added
        if record.token_id:
            usage.tokens[record.token_id] = usage.tokens.get(record.token_id, 0) + added
    usage.last_unix_ms = max(usage.last_unix_ms, record.unix_ms)
    return usage, added


# ---- what workers publish ----


class UsageMeter:
    """One session's frames sent by this worker, second by second (pure: the worker
    publishes what ``add`` and ``flush`` return)."""

    def __init__(self, session_id: str, model_id: str, fps: float, worker_id: str) -> None:
        self.session_id = session_id
        self.model_id = model_id
        self.per_second = frames_per_second(fps)
        self.worker_id = worker_id
        self.tenant = ""
        self.token_id = ""
        self._open: internal_pb2.UsageRecord | None = None

    def attached(self, tenant: str, token_id: str) -> None:
        """Frames from now on are billed to ``tenant`` under ``token_id``."""
        self.tenant, self.token_id = tenant, token_id

    def add(self, frame: pb.Frame, epoch: int) -> list[internal_pb2.UsageRecord]:
        """Count a frame sent; returns the records it closed: the one before it when it
        does not follow it (a later second, or a rewind), and its own when it completes
        its second."""
        second = frame.frame_index // self.per_second
        closed = []
        current = self._open
        if current is not None and (
            current.second != second or current.end_frame != frame.frame_index
        ):
            closed += self.flush()
        record = self._open
        if record is None:
            record = self._open = internal_pb2.UsageRecord(
                session_id=self.session_id,
                tenant=self.tenant,
                token_id=self.token_id,
                model_id=self.model_id,
                second=second,
                frames_per_second=self.per_second,
                first_frame=frame.frame_index,
                worker_id=self.worker_id,
                epoch=epoch,
            )
        record.end_frame = frame.frame_index + 1
        record.steps += frame.steps
        record.bytes_out += len(frame.data)
        latency = frame.latency
        record.compute_ms += latency.model_ms / max(1, latency.batch_size) + latency.encode_ms
        if record.end_frame % self.per_second == 0:  # its second is complete
            closed += self.flush()
        return closed

    def flush(self) -> list[internal_pb2.UsageRecord]:
        """The record of the frames counted and not returned yet, if any (a stream ends,
        or the tenant or token changes)."""
        record, self._open = self._open, None
        if record is None:
            return []
        record.unix_ms = int(time.time() * 1000)
        return [record]


class UsageLog:
    """Publishes usage records to JetStream (the stream is made by ``ensure``)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def ensure(self) -> None:
        try:
            await self._js.stream_info(USAGE_STREAM)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.add_stream(
                    name=USAGE_STREAM,
                    subjects=[USAGE_SUBJECTS],
                    storage=StorageType.FILE,
                    duplicate_window=USAGE_DUPLICATE_WINDOW_S,
                    num_replicas=stream_replicas(),
                )
            except nats.js.errors.BadRequestError:
                await self._js.stream_info(USAGE_STREAM)  # made concurrently

    async def publish(self, record: internal_pb2.UsageRecord) -> None:
        await self._js.publish(
            usage_subject(record.session_id),
            record.SerializeToString(),
            stream=USAGE_STREAM,
            headers={"Nats-Msg-Id": record_id(record)},
        )


# ---- the ledger ----


class Ledger:
    """Applies usage records to the per-session, per-tenant and per-token totals in etcd,
    each exactly once (``Ledger.run`` consumes the stream; ``apply_record`` is one)."""

    def __init__(self, client: Etcd3Client, js: JetStreamContext | None = None) -> None:
        self._etcd = client
        self._js = js
        self.applied = 0
        self.skipped = 0

    async def run(self, *, batch: int = 256, idle_wait_s: float = 1.0) -> None:
        """Consume WINDFLOW_USAGE with the durable consumer until cancelled."""
        assert self._js is not None
        await UsageLog(self._js).ensure()
        subscription = await self._js.pull_subscribe(
            USAGE_SUBJECTS,
            durable=LEDGER_CONSUMER,
            stream=USAGE_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=batch * 4,
            ),
        )
        try:
            await self._consume(subscription, idle_wait_s, batch)
        finally:
            # (a subscription left behind holds a NATS drain up for its whole timeout)
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _consume(self, subscription: Any, idle_wait_s: float, batch: int) -> None:
        while True:
            try:
                messages = await subscription.fetch(batch, timeout=idle_wait_s)
            except (nats.errors.TimeoutError, TimeoutError):  # nothing came: ask again
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS restarting, a slow server: never give up
                log.warning("usage ledger: fetch failed (%r); again", exc)
                await asyncio.sleep(idle_wait_s)
                continue
            for message in messages:
                record = internal_pb2.UsageRecord.FromString(message.data)
                seq = message.metadata.sequence.stream
                while True:
                    try:
                        await self.apply_record(record, seq)
                        break
                    except Exception:
                        log.warning("usage ledger: applying %d failed; again", seq, exc_info=True)
                        await asyncio.sleep(0.5)
                with contextlib.suppress(nats.errors.Error):
                    await message.ack()

    async def apply_record(self, record: internal_pb2.UsageRecord, seq: int) -> int:
        """Apply ``record`` (stream sequence ``seq``) unless the cursor is past it; returns
        the frames it added. One etcd transaction with the cursor: a concurrent ledger
        loses the compare and reads again."""
        kvs = etcd.kv(self._etcd)
        while True:
            cursor = await kvs.get(CURSOR_KEY)
            applied = int(cursor.kvs[0].value) if cursor.kvs else 0
            version = cursor.kvs[0].version if cursor.kvs else 0
            if seq <= applied:
                self.skipped += 1
                return 0
            usage, added = apply(await self.session(record.session_id), record)
            puts = [
                kvs.txn_op_put(CURSOR_KEY, str(seq).encode()),
                kvs.txn_op_put(session_key(record.session_id), msgspec.json.encode(usage)),
            ]
            if added:
                seconds = added / usage.fps
                for key, name in (
                    (tenant_key(record.tenant or "-"), record.tenant or "-"),
                    *([(token_key(record.token_id), record.token_id)] if record.token_id else []),
                ):
                    total = await self._total(key, name)
                    total.seconds += seconds
                    total.frames += added
                    total.last_unix_ms = max(total.last_unix_ms, record.unix_ms)
                    puts.append(kvs.txn_op_put(key, msgspec.json.encode(total)))
            done = await kvs.txn(
                compare=[kvs.txn_compare_version(CURSOR_KEY, version)], success=puts
            )
            if done.succeeded:
                self.applied += 1
                if added:
                    metrics.get().usage_billed_seconds.add(
                        added / usage.fps, {"model": usage.model_id}
                    )
                return added

    async def _total(self, key: str, name: str) -> TotalUsage:
        response = await etcd.kv(self._etcd).get(key)
        return _total_codec.decode(response.kvs[0].value) if response.kvs else TotalUsage(name=name)

    async def session(self, session_id: str) -> SessionUsage | None:
        response = await etcd.kv(self._etcd).get(session_key(session_id))
        return _session_codec.decode(response.kvs[0].value) if response.kvs else None

    async def token_seconds(self, token_id: str) -> float:
        """Streaming seconds billed under a token (what its budget is checked against)."""
        return (await self._total(token_key(token_id), token_id)).seconds

    async def sessions(self) -> list[SessionUsage]:
        prefix = f"{USAGE_PREFIX}sessions/".encode()
        response = await etcd.kv(self._etcd).get(prefix, prefix_range_end(prefix))
        return [_session_codec.decode(item.value) for item in response.kvs]

    async def totals(self, kind: str) -> list[TotalUsage]:
        """Every tenant's (``kind`` "tenants") or token's ("tokens") total."""
        prefix = f"{USAGE_PREFIX}{kind}/".encode()
        response = await etcd.kv(self._etcd).get(prefix, prefix_range_end(prefix))
        return [_total_codec.decode(item.value) for item in response.kvs]


def by_tenant(sessions: Iterable[SessionUsage], since_unix_ms: int = 0) -> dict[str, float]:
    """Billed seconds per tenant, over ``sessions`` (from ``since_unix_ms``)."""
    seconds: dict[str, float] = {}
    for usage in sessions:
        got = usage.seconds_since(since_unix_ms) if since_unix_ms else usage.seconds
        seconds[usage.tenant or "-"] = seconds.get(usage.tenant or "-", 0.0) + got
    return seconds
