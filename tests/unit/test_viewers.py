"""A spectator's queue (services/worker/viewers.py): newest frames first, its own drops
counted in its frames, events never dropped, a window of its own."""

from __future__ import annotations

from services.worker.viewers import SPECTATOR_FRAMES, Viewer
from windflow.v1 import windflow_pb2 as pb


def frame(index: int) -> pb.ServerMessage:
    return pb.ServerMessage(frame=pb.Frame(frame_index=index, data=b"x"))


def quality_event() -> pb.ServerMessage:
    return pb.ServerMessage(event=pb.SessionEvent(kind=pb.SessionEvent.KIND_QUALITY_CHANGED))


def test_a_slow_spectator_keeps_the_newest_frames_and_every_event() -> None:
    viewer = Viewer("v1", pb.ROLE_SPECTATOR)
    viewer.start_at(0, window=1)
    viewer.put(frame(0))
    viewer.put(quality_event())
    for index in range(1, 6):
        viewer.put(frame(index))
    taken = viewer.take()
    assert taken is not None and taken.HasField("event")  # before every frame left, kept
    kept = [m.frame for m in viewer.out]
    assert [f.frame_index for f in kept] == [4, 5][-SPECTATOR_FRAMES:]
    assert viewer.dropped == 4  # frames 0..3
    assert kept[-1].dropped_total == 4


def test_its_window_holds_frames_until_it_acks_and_a_copy_is_queued() -> None:
    viewer = Viewer("v1", pb.ROLE_SPECTATOR)
    viewer.start_at(10, window=2)
    original = frame(10)
    viewer.put(original)
    original.frame.frame_index = 99  # the controller's copy changes later: not this one
    viewer.put(frame(11))
    assert [m.frame.frame_index for m in (viewer.take(), viewer.take()) if m] == [10, 11]
    viewer.put(frame(12))
    assert viewer.take() is None  # two in flight: it waits for an ack
    viewer.ack(10)
    assert viewer.wake.is_set()
    later = viewer.take()
    assert later is not None and later.frame.frame_index == 12


def test_a_rewind_starts_its_window_over() -> None:
    viewer = Viewer("v1", pb.ROLE_SPECTATOR)
    viewer.start_at(50, window=1)
    viewer.put(frame(50))
    assert viewer.take() is not None
    viewer.put(
        pb.ServerMessage(event=pb.SessionEvent(kind=pb.SessionEvent.KIND_REWOUND, frame_index=5))
    )
    viewer.put(frame(5))
    assert viewer.take() is not None  # the event
    again = viewer.take()  # frame 5 goes out though frame 50 was never acked
    assert again is not None and again.frame.frame_index == 5
