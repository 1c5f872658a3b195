"""The bridge's outbound queue: a browser slower than the session gets its newest frame,
the older ones dropped and counted; events and errors are never dropped."""

from __future__ import annotations

from services.bridge.relay import Outbound
from windflow.v1 import windflow_pb2 as pb


def frame(index: int, dropped: int = 0) -> pb.ServerMessage:
    return pb.ServerMessage(frame=pb.Frame(frame_index=index, dropped_total=dropped))


def event(kind: pb.SessionEvent.Kind.ValueType) -> pb.ServerMessage:
    return pb.ServerMessage(event=pb.SessionEvent(kind=kind))


def test_the_newest_frame_wins_and_events_all_go_first() -> None:
    out = Outbound()
    assert out.empty.is_set() and not out.ready.is_set()
    out.put(frame(0))
    out.put(event(pb.SessionEvent.KIND_ATTACHED))
    out.put(frame(1))
    out.put(frame(2, dropped=5))  # the worker's own DROP_OLDEST count so far
    out.put(event(pb.SessionEvent.KIND_QUALITY_CHANGED))
    assert out.ready.is_set() and not out.empty.is_set()
    taken = [out.take() for _ in range(4)]
    kinds = [m.WhichOneof("msg") if m is not None else None for m in taken]
    assert kinds == ["event", "event", "frame", None]
    sent = taken[2]
    assert sent is not None
    assert sent.frame.frame_index == 2
    assert sent.frame.dropped_total == 5 + 2  # the worker's and the bridge's
    assert out.empty.is_set() and not out.ready.is_set()


def test_a_browser_that_keeps_up_loses_nothing() -> None:
    out = Outbound()
    got = []
    for i in range(10):
        out.put(frame(i))
        message = out.take()
        assert message is not None
        got.append(message.frame.frame_index)
    assert got == list(range(10)) and out.dropped == 0
