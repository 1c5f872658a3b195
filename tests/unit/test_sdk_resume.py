"""The SDK resumes a stream whose gateway went away (pure: gateways are stand-in stubs
whose calls play scripted server messages, then end with a status)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from windflow.errors import NotFound, Unavailable
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.sdk.resume import PendingControls, parse_addresses, retry_delay_s
from windflow.v1 import windflow_pb2 as pb

# -- addresses, controls, pauses ----------------------------------------------------------


def test_addresses_from_one_a_list_or_comma_separated() -> None:
    assert parse_addresses("127.0.0.1:1") == ["127.0.0.1:1"]
    assert parse_addresses(" a:1, b:2 ,,a:1 ") == ["a:1", "b:2"]
    assert parse_addresses(["a:1", "b:2,c:3", "b:2"]) == ["a:1", "b:2", "c:3"]
    assert parse_addresses(("[::1]:5",)) == ["[::1]:5"]
    for empty in ("", " , ", [], [""]):
        with pytest.raises(ValueError):
            parse_addresses(empty)
    with pytest.raises(TypeError):
        parse_addresses([1])  # type: ignore[list-item]


async def test_client_takes_one_address_or_several() -> None:
    # (no RPC: a channel connects on its first call)
    async with Client("127.0.0.1:1") as one:
        assert (one.address, one.addresses) == ("127.0.0.1:1", ["127.0.0.1:1"])
    async with Client("127.0.0.1:1,127.0.0.1:2", resume_timeout_s=3.0) as several:
        assert several.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
        assert several.address == "127.0.0.1:1" and several.resume_timeout_s == 3.0
    async with Client(["127.0.0.1:2", "127.0.0.1:1"]) as listed:
        assert listed.address == "127.0.0.1:2"


def _control(frame: int, action: int = 0) -> pb.Control:
    return pb.Control(frame_index=frame, action=action)


def test_resent_controls_are_those_for_frames_not_received_and_not_refused() -> None:
    pending = PendingControls()
    for frame, action in [(0, 1), (3, 2), (5, 1), (7, 2), (7, 3), (9, 1), (12, 0)]:
        pending.sent(_control(frame, action))
    pending.received(4)  # frames up to 4 came
    pending.refused(_control(9, 1))  # the server said no
    pending.refused(_control(99, 1))  # (never sent: nothing to forget)
    assert pending.to_resend(4) == [_control(5, 1), _control(7, 2), _control(7, 3), _control(12)]
    assert pending.to_resend(7) == [_control(12)]  # the last frame received was 7
    pending.rewound()
    assert pending.to_resend(-1) == []


def test_a_refusal_forgets_the_newest_equal_control_only() -> None:
    pending = PendingControls()
    pending.sent(_control(5, 1))
    pending.sent(_control(5, 1))
    pending.refused(_control(5, 1))
    assert pending.to_resend(0) == [_control(5, 1)]


def test_remembered_controls_are_bounded_oldest_first() -> None:
    pending = PendingControls(limit=3)
    for frame in range(5):
        pending.sent(_control(10 + frame))
    assert [c.frame_index for c in pending.to_resend(-1)] == [12, 13, 14]


def test_a_remembered_control_is_a_copy() -> None:
    pending = PendingControls()
    control = _control(5, 1)
    pending.sent(control)
    control.action = 3
    assert pending.to_resend(0) == [_control(5, 1)]


def test_retry_delays_start_at_once_then_double_to_a_cap() -> None:
    assert [retry_delay_s(n) for n in range(8)] == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


# -- a session across stand-in gateways ---------------------------------------------------


def _frame(i: int) -> pb.ServerMessage:
    return pb.ServerMessage(frame=pb.Frame(frame_index=i))


def _event(kind: pb.SessionEvent.Kind.ValueType, frame: int = 0) -> pb.ServerMessage:
    return pb.ServerMessage(event=pb.SessionEvent(kind=kind, frame_index=frame))


ATTACHED = pb.SessionEvent.KIND_ATTACHED
CLOSED = pb.SessionEvent.KIND_CLOSED


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"{code.name} here")


class FakeCall:
    """One Stream call: takes writes, plays ``messages``, then ends with ``end`` (or OK)."""

    def __init__(
        self, messages: list[pb.ServerMessage], end: grpc.StatusCode | None = None
    ) -> None:
        self.messages = messages
        self.end = end
        self.written: list[pb.ClientMessage] = []
        self.cancelled = False
        self.broken = False
        """Writes fail with ``end`` (the connection is gone; the reader has not seen it)."""

    async def write(self, message: pb.ClientMessage) -> None:
        if self.broken:
            assert self.end is not None
            raise _rpc_error(self.end)
        self.written.append(message)

    def cancel(self) -> None:
        self.cancelled = True

    async def code(self) -> grpc.StatusCode:
        return self.end or grpc.StatusCode.OK

    def __aiter__(self) -> AsyncIterator[pb.ServerMessage]:
        return self._play()

    async def _play(self) -> AsyncIterator[pb.ServerMessage]:
        for message in self.messages:
            yield message
        if self.end is not None:
            raise _rpc_error(self.end)

    @property
    def attach(self) -> pb.Attach:
        assert self.written and self.written[0].HasField("attach")
        return self.written[0].attach

    @property
    def acks(self) -> list[int]:
        return [m.ack.frame_index for m in self.written if m.HasField("ack")]


class FakeStub:
    """A gateway: each Stream() is its next scripted call (a refused connection when none
    is left)."""

    def __init__(self, *calls: FakeCall) -> None:
        self.calls = list(calls)
        self.made: list[FakeCall] = []

    def Stream(self, metadata: object = None) -> FakeCall:
        call = self.calls.pop(0) if self.calls else FakeCall([], grpc.StatusCode.UNAVAILABLE)
        self.made.append(call)
        return call


def _session(*stubs: FakeStub, resume_timeout_s: float = 5.0) -> Session:
    info = pb.Session(session_id="s", spec=pb.SessionSpec(fps=24))
    gateways: list[tuple[str, Any]] = [(f"gw{i}:1", stub) for i, stub in enumerate(stubs)]
    return Session(
        gateways[0][1], info, window=8, gateways=gateways, resume_timeout_s=resume_timeout_s
    )


async def test_a_stream_resumes_through_the_next_gateway_with_no_gap_and_no_repeat() -> None:
    first = FakeCall(
        [_event(ATTACHED, 0), *(_frame(i) for i in range(5))],
        grpc.StatusCode.UNAVAILABLE,  # its gateway was killed
    )
    # the other gateway's stream overlaps what came (3, 4): those are not yielded again
    second = FakeCall([_event(ATTACHED, 5), *(_frame(i) for i in range(3, 10)), _event(CLOSED)])
    a, b = FakeStub(first), FakeStub(second)
    session = _session(a, b)
    await session.start([(0, 1)])
    for frame, action in [(2, 1), (7, 2), (9, 3), (8, 1)]:
        await session.send(action=action, frame_index=frame)
    # the server refuses the one for frame 9, echoing it, before the stream breaks
    refused = next(m.control for m in first.written if m.control.frame_index == 9)
    first.messages.append(pb.ServerMessage(error=pb.StreamError(code=3, control=refused)))

    indices = [f.index async for f in session.frames()]

    assert indices == list(range(10))
    assert session.resumes == 1 and session.gateway == "gw1:1"
    # resumed at the frame after the last one received, with the controls for later frames
    # that were not refused (9 was), in the order they were sent, as they were sent
    attach = second.attach
    assert (attach.session_id, attach.window, attach.resume, attach.resume_from) == (
        "s",
        8,
        True,
        5,
    )
    sent = [m.control for m in first.written if m.HasField("control")]
    assert list(attach.controls) == [c for c in sent if c.frame_index in (7, 8)]
    assert [(c.frame_index, c.action) for c in attach.controls] == [(7, 2), (8, 1)]
    assert [c.frame_index for c in first.attach.controls] == [0]
    # acks go on, every quarter window, counted from where the new stream starts
    assert first.acks == [1, 3] and second.acks == [6, 8]
    recovered = [e for e in session.events if e.kind == pb.SessionEvent.KIND_RECOVERED]
    assert len(recovered) == 1 and recovered[0].frame_index == 5
    assert "gateway gw1:1" in recovered[0].message and "gw0:1" in recovered[0].message
    kinds = [e.kind for e in session.events]
    assert kinds == [ATTACHED, pb.SessionEvent.KIND_RECOVERED, ATTACHED, CLOSED]


async def test_it_goes_round_the_gateways_until_one_answers() -> None:
    first = FakeCall([_frame(0), _frame(1)], grpc.StatusCode.UNAVAILABLE)
    back = FakeCall([_frame(2), _event(CLOSED)])
    a = FakeStub(first, FakeCall([], grpc.StatusCode.UNAVAILABLE), back)  # restarting
    b = FakeStub()  # down
    session = _session(a, b)
    await session.start()

    assert [f.index async for f in session.frames()] == [0, 1, 2]
    assert [len(a.made), len(b.made)] == [3, 2]  # a, b, a, b, a
    assert back.attach.resume and back.attach.resume_from == 2
    assert session.resumes == 1 and session.gateway == "gw0:1"


async def test_a_control_sent_while_the_stream_is_down_goes_with_the_resume() -> None:
    first = FakeCall([_frame(0), _frame(1), _frame(2)], grpc.StatusCode.UNAVAILABLE)
    second = FakeCall([_frame(3), _event(CLOSED)])
    session = _session(FakeStub(first), FakeStub(second))
    await session.start()
    got = []
    async for frame in session.frames():
        got.append(frame.index)
        if frame.index == 2:
            first.broken = True  # the gateway is gone; the reader learns it next
            assert await session.send(action=4, frame_index=6) == 6  # kept, not raised
    assert got == [0, 1, 2, 3]
    assert [(c.frame_index, c.action) for c in second.attach.controls] == [(6, 4)]


async def test_before_it_attached_a_stream_attaches_afresh_with_its_controls() -> None:
    first = FakeCall([], grpc.StatusCode.UNAVAILABLE)
    second = FakeCall([_event(ATTACHED, 40), _frame(40), _event(CLOSED)])
    session = _session(FakeStub(first), FakeStub(second))
    await session.start([(40, 2)])
    await session.send(action=1, frame_index=44)

    assert [f.index async for f in session.frames()] == [40]
    assert not second.attach.resume
    assert [(c.frame_index, c.action) for c in second.attach.controls] == [(40, 2), (44, 1)]


async def test_it_gives_up_after_its_deadline() -> None:
    session = _session(
        FakeStub(FakeCall([_frame(0)], grpc.StatusCode.UNAVAILABLE)),
        FakeStub(),
        resume_timeout_s=0.3,
    )
    await session.start()
    got = []
    with pytest.raises(Unavailable, match="could not be resumed through gw0:1, gw1:1"):
        async for frame in session.frames():
            got.append(frame.index)
    assert got == [0] and session.resumes == 0
    with pytest.raises(Unavailable):  # a send on it says so too
        await session.send(action=1)


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE])
async def test_other_errors_and_resume_off_end_the_stream_at_once(code: grpc.StatusCode) -> None:
    a = FakeStub(FakeCall([_frame(0)], code))
    b = FakeStub()
    session = _session(a, b, resume_timeout_s=0.0 if code == grpc.StatusCode.UNAVAILABLE else 5.0)
    await session.start()
    with pytest.raises(NotFound if code == grpc.StatusCode.NOT_FOUND else Unavailable):
        async for _ in session.frames():
            pass
    assert [len(a.made), len(b.made)] == [1, 0]
