"""The SDK acknowledges consumed frames cumulatively, every quarter window (pure: the
stream is a list of server messages)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from windflow.sdk.client import Session
from windflow.v1 import windflow_pb2 as pb


def _frame(i: int) -> pb.ServerMessage:
    return pb.ServerMessage(frame=pb.Frame(frame_index=i))


def _rewound(to: int) -> pb.ServerMessage:
    return pb.ServerMessage(
        event=pb.SessionEvent(kind=pb.SessionEvent.KIND_REWOUND, frame_index=to)
    )


async def _acks(window: int, messages: list[pb.ServerMessage]) -> list[int]:
    info = pb.Session(session_id="s", spec=pb.SessionSpec(fps=24))
    session = Session(None, info, window=window)  # type: ignore[arg-type]

    async def stream() -> AsyncIterator[pb.ServerMessage]:
        for m in messages:
            yield m

    written: list[pb.ClientMessage] = []

    async def write(message: pb.ClientMessage, *, quiet: bool = False) -> None:
        assert quiet  # an ack on a stream that has ended is dropped, not raised
        written.append(message)

    call: Any = stream()
    session._call = call
    session._write = write  # type: ignore[method-assign]
    async for _ in session.frames():
        pass
    assert all(m.HasField("ack") for m in written)
    return [m.ack.frame_index for m in written]


@pytest.mark.parametrize("window", [1, 2, 3])
async def test_a_small_window_acks_every_frame(window: int) -> None:
    assert await _acks(window, [_frame(i) for i in range(5)]) == [0, 1, 2, 3, 4]


async def test_a_window_of_8_acks_every_second_frame_and_restarts_after_a_rewind() -> None:
    stream = [*(_frame(i) for i in range(10)), _rewound(3), *(_frame(i) for i in range(3, 7))]
    assert await _acks(8, stream) == [1, 3, 5, 7, 9, 4, 6]


async def test_a_window_of_16_acks_every_fourth_frame() -> None:
    assert await _acks(16, [_frame(i) for i in range(9)]) == [3, 7]
