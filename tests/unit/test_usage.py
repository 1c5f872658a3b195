"""Usage metering's pure parts: the meter's records and the ledger's frame union."""

from __future__ import annotations

import pytest

from windflow.access.usage import (
    SessionUsage,
    UsageMeter,
    add_range,
    apply,
    by_tenant,
    frames_per_second,
    record_id,
)
from windflow.cli.usage import since_unix_ms
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb


def frame(index: int, size: int = 10) -> pb.Frame:
    return pb.Frame(
        frame_index=index,
        data=b"x" * size,
        steps=2,
        latency=pb.LatencyBreakdown(model_ms=8.0, batch_size=2, encode_ms=1.0),
    )


def test_frames_per_second_rounds_up() -> None:
    assert [frames_per_second(f) for f in (24.0, 23.976, 8.0, 0.5)] == [24, 24, 8, 1]


def test_meter_closes_one_record_per_second() -> None:
    meter = UsageMeter("s", "m", 4.0, "w1")
    meter.attached("acme", "jti1")
    closed = []
    for i in range(10):
        closed += meter.add(frame(i), epoch=3)
    assert [(r.second, r.first_frame, r.end_frame) for r in closed] == [(0, 0, 4), (1, 4, 8)]
    first = closed[0]
    assert (first.tenant, first.token_id, first.worker_id, first.epoch) == ("acme", "jti1", "w1", 3)
    assert (first.steps, first.bytes_out) == (8, 40)
    assert first.compute_ms == pytest.approx(4 * (8.0 / 2 + 1.0))
    (partial,) = meter.flush()
    assert (partial.second, partial.first_frame, partial.end_frame) == (2, 8, 10)
    assert meter.flush() == []
    assert record_id(partial) == "s.2.8.10"


def test_a_jump_back_closes_the_open_record() -> None:
    meter = UsageMeter("s", "m", 4.0, "w1")
    assert meter.add(frame(0), 1) == [] and meter.add(frame(1), 1) == []
    (before,) = meter.add(frame(0), 1)  # a rewind to 0
    assert (before.first_frame, before.end_frame) == (0, 2)


def test_add_range_counts_only_new_frames() -> None:
    ranges, added = add_range([], 0, 24)
    assert (ranges, added) == ([(0, 24)], 24)
    ranges, added = add_range(ranges, 20, 30)  # a migration's or a recovery's overlap
    assert (ranges, added) == ([(0, 30)], 6)
    ranges, added = add_range(ranges, 40, 48)
    assert (ranges, added) == ([(0, 30), (40, 48)], 8)
    ranges, added = add_range(ranges, 25, 45)  # bridges the hole
    assert (ranges, added) == ([(0, 48)], 10)
    assert add_range(ranges, 0, 48) == ([(0, 48)], 0)
    assert add_range(ranges, 5, 5) == ([(0, 48)], 0)


def record(
    lo: int, hi: int, *, token: str = "t1", unix_ms: int = 60_000
) -> internal_pb2.UsageRecord:
    return internal_pb2.UsageRecord(
        session_id="s",
        tenant="acme",
        token_id=token,
        model_id="m",
        second=lo // 24,
        frames_per_second=24,
        first_frame=lo,
        end_frame=hi,
        steps=2 * (hi - lo),
        bytes_out=100 * (hi - lo),
        compute_ms=float(hi - lo),
        unix_ms=unix_ms,
    )


def test_apply_bills_each_frame_once_and_splits_by_token() -> None:
    usage, added = apply(None, record(0, 24))
    assert added == 24 and usage.seconds == 1.0
    usage, added = apply(usage, record(0, 24))  # delivered twice
    assert added == 0 and usage.frames == 24
    usage, added = apply(usage, record(12, 36, token="t2", unix_ms=180_000))
    assert added == 12
    assert usage.frames == 36 and usage.seconds == 1.5
    assert usage.tokens == {"t1": 24, "t2": 12}
    assert (usage.steps, usage.bytes_out) == (72, 3600)
    assert usage.seconds_since(120_000) == 0.5  # the minute buckets
    assert by_tenant([usage, SessionUsage(session_id="x", fps=24, frames=24)]) == {
        "acme": 1.5,
        "-": 1.0,
    }


def test_since_parses_ages_and_iso_times() -> None:
    assert since_unix_ms(None) == 0
    assert since_unix_ms("90s", now=1000.0) == 910_000
    assert since_unix_ms("2h", now=10_000.0) == 2_800_000
    assert since_unix_ms("1970-01-01T00:01:00") == 60_000
    with pytest.raises(SystemExit):
        since_unix_ms("yesterday")
