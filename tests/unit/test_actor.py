"""Session actor queues: controls by frame, bounded output, flow control."""

from __future__ import annotations

import asyncio

import pytest

from services.worker.actor import SessionActor
from tests.fakes import FakeWorld
from windflow.errors import InvalidArgument, InvalidControl, ResourceExhausted
from windflow.v1 import windflow_pb2 as pb


def actor(
    policy: pb.OutputPolicy.ValueType = pb.OUTPUT_POLICY_DROP_OLDEST, out_queue: int = 3
) -> SessionActor:
    model = FakeWorld()
    spec = pb.SessionSpec(model_id="fake-world", fps=24, steps=2, output_policy=policy)
    return SessionActor(
        "s",
        spec,
        model,
        model.new_state(1),
        epoch=1,
        window=2,
        out_queue=out_queue,
        max_pending_controls=3,
        now=0.0,
    )


def frame(i: int) -> pb.ServerMessage:
    return pb.ServerMessage(frame=pb.Frame(frame_index=i))


def test_controls_apply_at_their_frame_and_stick() -> None:
    a = actor()
    a.add_control(pb.Control(frame_index=2, action=2, client_time_us=7))
    a.add_control(pb.Control(frame_index=0, action=1))
    applied = []
    for _ in range(4):
        c = a.take_control()
        applied.append((c.control.action, c.client_time_us))
        a.begin_step()
        a.end_step()
    assert applied == [(1, 0), (1, 0), (2, 7), (2, 0)]


async def test_a_pipelined_session_takes_its_next_control_while_a_frame_is_in_flight() -> None:
    a = actor()
    a.attach(2)
    a.pipeline = 2
    a.add_control(pb.Control(frame_index=1, action=2, client_time_us=9))
    assert a.take_control().control.action == 0 and a.next_frame == 0
    a.begin_step()  # frame 0 in flight
    assert a.next_frame == 1 and a.stepping and a.ready  # room for one more
    assert a.control_waiting
    assert a.take_control().control.action == 2
    a.begin_step()  # frame 1 queued behind it
    assert a.next_frame == 2 and not a.ready
    with pytest.raises(InvalidArgument, match="in the past"):
        a.add_control(pb.Control(frame_index=1, action=1))
    a.end_step()
    assert a.stepping and a.ready
    idle = asyncio.ensure_future(a.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()  # a restore must wait for both
    a.end_step()
    await asyncio.wait_for(idle, 1.0)
    assert not a.stepping


def test_frames_in_flight_count_against_a_paused_sessions_queue() -> None:
    a = actor(pb.OUTPUT_POLICY_PAUSE, out_queue=2)
    a.attach(2)
    a.pipeline = 2
    a.push(frame(0))
    assert a.ready
    a.begin_step()
    assert not a.ready  # one queued + one in flight fill the queue of 2
    a.end_step()
    assert a.ready


def test_refused_controls() -> None:
    a = actor()
    a.state.frame_index = 5
    a.reset_to(a.state)
    with pytest.raises(InvalidArgument, match="in the past"):
        a.add_control(pb.Control(frame_index=4, action=1))
    with pytest.raises(InvalidControl, match="outside the action space"):
        a.add_control(pb.Control(frame_index=6, action=3))
    for i in range(3):
        a.add_control(pb.Control(frame_index=6 + i, action=1))
    with pytest.raises(ResourceExhausted):
        a.add_control(pb.Control(frame_index=20, action=1))


def test_add_controls_is_all_or_nothing() -> None:
    a = actor()
    with pytest.raises(InvalidControl):
        a.add_controls([pb.Control(frame_index=0, action=1), pb.Control(frame_index=1, action=9)])
    assert a.take_control().control.action == 0


def test_drop_oldest_keeps_the_newest_frames_and_counts() -> None:
    a = actor(out_queue=3)
    a.attach(0)
    for i in range(5):
        a.push(frame(i))
    assert [m.frame.frame_index for m in a.out] == [2, 3, 4]
    assert a.dropped == 2 and a.out[-1].frame.dropped_total == 2
    assert a.ready  # DROP_OLDEST never holds generation back


def test_pause_holds_generation_until_the_client_reads() -> None:
    a = actor(policy=pb.OUTPUT_POLICY_PAUSE, out_queue=2)
    a.attach(0)
    a.push(frame(0))
    assert a.ready
    a.push(frame(1))
    assert not a.ready
    a.pop()
    assert a.ready and a.dropped == 0


def test_window_limits_frames_in_flight_but_not_events() -> None:
    a = actor(out_queue=8)
    a.attach(2)
    for i in range(4):
        a.push(frame(i))
    sent = []
    while a.can_send():
        sent.append(a.pop().frame.frame_index)
    assert sent == [0, 1]
    a.push(pb.ServerMessage(event=pb.SessionEvent(kind=pb.SessionEvent.KIND_QUALITY_CHANGED)))
    a.ack(0)
    sent = []
    while a.can_send():
        sent.append(a.pop().frame.frame_index)
    assert sent == [2]
    a.ack(3)  # acks beyond what was sent are clamped
    assert a.last_acked == 2


def test_not_ready_unless_attached() -> None:
    a = actor()
    assert not a.ready
    a.attach(0)
    assert a.ready
    a.detach(now=5.0)
    assert not a.ready


def test_idle_time_counts_from_open_or_detach_never_while_attached() -> None:
    a = actor()  # opened at now=0
    assert (a.idle_s(4.0), a.ever_attached) == (4.0, False)
    a.attach(0)
    assert (a.idle_s(9.0), a.ever_attached) == (0.0, True)
    a.detach(now=10.0)
    assert a.idle_s(12.5) == 2.5


def test_control_waiting_only_for_the_next_frame() -> None:
    a = actor()
    assert not a.control_waiting
    a.add_control(pb.Control(frame_index=1, action=2))
    assert not a.control_waiting  # stamped for a later frame
    a.add_control(pb.Control(frame_index=0, action=1))
    assert a.control_waiting
    a.take_control()
    assert not a.control_waiting


def test_pause_counts_frames_still_being_released() -> None:
    a = actor(pb.OUTPUT_POLICY_PAUSE, out_queue=2)
    a.attach(8)
    a.push(frame(0))
    assert a.ready
    a.unreleased = 1  # a stepped frame not yet pushed fills the queue's last place
    assert not a.ready


def test_reset_to_starts_a_new_generation() -> None:
    a = actor()
    before = a.generation
    a.reset_to(a.model.new_state(2))
    assert a.generation == before + 1


def test_frames_awaiting_release_are_bounded_under_drop_oldest() -> None:
    a = actor(out_queue=2)
    a.attach(8)
    a.unreleased = 1
    assert a.ready
    a.unreleased = 2  # as many as the output queue holds: wait for the log server
    assert not a.ready


def test_a_resumed_attach_takes_its_controls_one_by_one_past_the_pending_bound() -> None:
    """The controls a gateway re-sends at a recovery were accepted once: one refused now
    (out of range, or in the past) does not take the others with it, and more than the
    pending bound (frames made meanwhile turned pending controls into re-sent ones) are
    all taken."""
    a = actor()  # max_pending_controls=3
    a.begin_step()  # frame 0 made: a control for it is in the past now
    a.end_step()
    msgs = [pb.Control(frame_index=f, action=1 + f % 2) for f in range(1, 6)]
    msgs.insert(2, pb.Control(frame_index=3, action=9))  # out of the action space
    msgs.insert(0, pb.Control(frame_index=0, action=1))  # in the past
    refused = a.resume_controls(msgs)
    assert [(c.frame_index, c.action, type(e).__name__) for c, e in refused] == [
        (0, 1, "InvalidArgument"),
        (3, 9, "InvalidControl"),
    ]
    taken = []
    for _ in range(5):
        taken.append(a.take_control().control.action)
        a.begin_step()
        a.end_step()
    assert taken == [2, 1, 2, 1, 2]  # frames 1..5, all five (over the bound of 3)
