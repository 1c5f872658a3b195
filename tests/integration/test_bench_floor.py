"""bench_floor: two bare gRPC hops through real processes, as bench runtime measures them."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from windflow.cli import bench_floor


async def test_the_floor_streams_every_payload_through_source_and_relay(tmp_path: Path) -> None:
    floor = await bench_floor.measure(4096, 100.0, 1.0, 0.2, tmp_path, answer_after_ms=5.0)
    # 1.2 s at 100 fps, the first 0.2 s dropped: every payload arrived, whole (measure
    # checks each one's size), and each leg took some time, not none
    assert len(floor.first_hop_ms) == len(floor.second_hop_ms) == 100
    assert all(ms > 0 for ms in floor.first_hop_ms + floor.second_hop_ms)
    # controls sent 2-5 frame intervals apart for 1.2 s, each answered through both hops,
    # 5 ms after it came: the wait is not counted (counted, every one would be >= 5 ms;
    # the hops take ~1-2 ms here)
    assert 10 <= len(floor.round_trip_ms) <= 60
    assert all(ms > 0 for ms in floor.round_trip_ms)
    assert statistics.median(floor.round_trip_ms) < 5.0
    # both children ran under the runtime's supervisor code, with their logs here
    assert sorted(os.listdir(tmp_path)) == ["floor-relay.log", "floor-source.log"]


@pytest.mark.parametrize(
    "argv",
    [
        ["source", "--listen", "127.0.0.1:0", "--bytes", "12", "--fps", "24"],
        [
            "source",
            "--listen",
            "127.0.0.1:0",
            "--bytes",
            "64",
            "--fps",
            "24",
            "--answer-after-ms",
            "-1",
        ],
        ["source", "--listen", "127.0.0.1:0", "--bytes", "4096", "--fps", "0"],
        ["relay", "--listen", "127.0.0.1:0"],
    ],
)
def test_the_children_refuse_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_floor.main(argv)
    assert exc.value.code == 2
