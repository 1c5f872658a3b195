"""StreamProxy across a worker failure, against real gRPC servers on port 0.

The workers and the router are small fakes of the real Worker and Router interfaces: each
worker's Attach plays a script per call (frames, a refusal, a failure), and the router's
Recover answers a given placement. The client is an async generator the test feeds. The
cases follow docs/state.md, "Crash recovery", steps 1 and 4: the client sees a pause, one
KIND_RECOVERED event and the next index, never a gap and never a repeat; the controls for
frames not yet delivered are re-sent, except those a worker refused; a leg that failed
before its KIND_ATTACHED recovers without resume.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.gateway.proxy import BROKEN_LEG_DETAILS, StreamProxy
from windflow.common.grpc_util import RETRY_AFTER_KEY
from windflow.errors import Internal
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

SESSION = "s-proxy"
HEAD = 10
"""Where worker A's stream starts (its KIND_ATTACHED frame index)."""
LAST_ON_A = 14
"""The last frame worker A sends before its leg breaks."""
FRAMES_ON_B = 5

ATTACHED = pb.SessionEvent.KIND_ATTACHED
RECOVERED = pb.SessionEvent.KIND_RECOVERED

Requests = AsyncIterator[pb.ClientMessage]
Script = Callable[[pb.Attach, Requests, grpc.aio.ServicerContext], AsyncIterator[pb.ServerMessage]]


def frame(worker: str, index: int) -> pb.ServerMessage:
    return pb.ServerMessage(frame=pb.Frame(frame_index=index, data=f"{worker}:{index}".encode()))


def event(kind: pb.SessionEvent.Kind.ValueType, index: int) -> pb.ServerMessage:
    return pb.ServerMessage(event=pb.SessionEvent(kind=kind, frame_index=index))


def control(index: int, action: int) -> pb.Control:
    return pb.Control(frame_index=index, action=action, client_time_us=1000 + index)


# ---- worker scripts: one Attach call each ----


def breaks_after(
    worker: str, *, last: int = LAST_ON_A, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
) -> Script:
    """Attached at HEAD, frames HEAD..last, then the leg fails with ``code``."""

    async def script(
        attach: pb.Attach, requests: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        yield event(ATTACHED, HEAD)
        for index in range(HEAD, last + 1):
            yield frame(worker, index)
        await context.abort(code, f"worker {worker} fails on purpose")

    return script


def fails_at_once(code: grpc.StatusCode, details: str = "no such session here") -> Script:
    """The leg fails before its KIND_ATTACHED."""

    async def script(
        attach: pb.Attach, requests: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        await context.abort(code, details)
        yield pb.ServerMessage()  # unreachable: makes this an async generator

    return script


def refuses_one_then_breaks(worker: str, controls: int, refused: pb.Control) -> Script:
    """Frames HEAD..12; then reads ``controls`` client controls and refuses ``refused``
    among them (a StreamError carrying it); frames 13..LAST_ON_A; then UNAVAILABLE."""

    async def script(
        attach: pb.Attach, requests: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        yield event(ATTACHED, HEAD)
        for index in range(HEAD, 13):
            yield frame(worker, index)
        received: list[pb.Control] = []
        while len(received) < controls:
            message = await anext(requests)
            if message.HasField("control"):
                received.append(message.control)
        assert refused in received
        yield pb.ServerMessage(
            error=pb.StreamError(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                code_name="INVALID_ARGUMENT",
                message="action 9 is not in the model's action space",
                frame_index=refused.frame_index,
                control=refused,
            )
        )
        for index in range(13, LAST_ON_A + 1):
            yield frame(worker, index)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {worker} fails on purpose")

    return script


def streams(worker: str, *, head: int = 30, overlap: int = 0) -> Script:
    """A worker holding the session: from ``resume_from`` (less ``overlap``, a worker that
    sends some it was not asked for) when resumed, else from its ``head``; then it ends."""

    async def script(
        attach: pb.Attach, requests: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        start = attach.resume_from if attach.resume else head
        yield event(ATTACHED, start)
        for index in range(start - overlap, start + FRAMES_ON_B):
            yield frame(worker, index)

    return script


# ---- the fakes ----


class ScriptedWorker(internal_pb2_grpc.WorkerServicer):
    """A worker whose n-th Attach plays the n-th script; it records every Attach it got."""

    def __init__(self, name: str, scripts: list[Script]) -> None:
        self.name = name
        self.scripts = scripts
        self.attaches: list[pb.Attach] = []
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        self.address = ""

    async def start(self) -> None:
        internal_pb2_grpc.add_WorkerServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def Attach(
        self, request_iterator: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        first = await anext(request_iterator)
        assert first.HasField("attach"), "the first message on a leg must be its Attach"
        self.attaches.append(first.attach)
        if len(self.attaches) > len(self.scripts):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no script for this Attach")
        script = self.scripts[len(self.attaches) - 1]
        async for message in script(first.attach, request_iterator, context):
            yield message

    async def OpenSession(
        self, request: internal_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.OpenSessionResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")

    async def Rewind(
        self, request: pb.RewindRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")

    async def Replay(
        self, request: internal_pb2.WorkerReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        yield pb.Frame()

    async def GetSessionStatus(
        self, request: internal_pb2.GetSessionStatusRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")

    async def CloseSession(
        self, request: internal_pb2.CloseWorkerSessionRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SessionStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")


class FakeRouter(internal_pb2_grpc.RouterServicer):
    """Recover records each request and answers ``placement`` (after ``unavailable``
    answers of UNAVAILABLE with a retry hint, as when no worker serves the model yet)."""

    def __init__(self) -> None:
        self.placement = internal_pb2.Placement()
        self.unavailable = 0
        self.requests: list[internal_pb2.RecoverRequest] = []
        self.server = grpc.aio.server()
        self.address = ""

    async def start(self) -> None:
        internal_pb2_grpc.add_RouterServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def Recover(
        self, request: internal_pb2.RecoverRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.Placement:
        self.requests.append(request)
        if len(self.requests) <= self.unavailable:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, "50"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no live worker serves the model")
        return self.placement

    async def Place(
        self, request: internal_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.Placement:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError("unreachable")


class Stage:
    """Workers A and B, the router, and the proxy's client: what each case drives."""

    def __init__(self) -> None:
        self.workers: dict[str, ScriptedWorker] = {}
        self.router = FakeRouter()  # type: ignore[abstract]  # (only Recover is called)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.dialed: list[str] = []
        """The worker addresses the proxy asked for, one per leg."""
        self.client: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()

    async def worker(self, name: str, scripts: list[Script]) -> ScriptedWorker:
        worker = ScriptedWorker(name, scripts)  # type: ignore[abstract]  # (Attach only)
        await worker.start()
        self.workers[name] = worker
        return worker

    def placement(self, worker: ScriptedWorker, epoch: int) -> internal_pb2.Placement:
        return internal_pb2.Placement(
            session_id=SESSION, worker_id=worker.name, worker_address=worker.address, epoch=epoch
        )

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return self.channels[address]

    def _stub(self, address: str) -> internal_pb2_grpc.WorkerStub:
        self.dialed.append(address)
        return internal_pb2_grpc.WorkerStub(self._channel(address))

    def proxy(self, attach: pb.Attach, placed_on: ScriptedWorker) -> StreamProxy:
        record = internal_pb2.PlacementRecord(
            worker_id=placed_on.name, worker_address=placed_on.address, epoch=1
        )
        return StreamProxy(
            pb.ClientMessage(attach=attach),
            record,
            worker=self._stub,
            router=internal_pb2_grpc.RouterStub(self._channel(self.router.address)),
            recover_timeout_s=5,
        )

    async def requests(self) -> Requests:
        while (message := await self.client.get()) is not None:
            yield message

    async def run(self, proxy: StreamProxy) -> list[pb.ServerMessage]:
        """Everything the client receives, until the stream ends."""
        async with asyncio.timeout(5):
            return [message async for message in proxy.run(self.requests())]

    async def aclose(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        for worker in self.workers.values():
            await worker.server.stop(0)
        await self.router.server.stop(0)


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    stage = Stage()
    await stage.router.start()
    try:
        yield stage
    finally:
        await stage.aclose()


def frames(messages: list[pb.ServerMessage]) -> list[int]:
    return [m.frame.frame_index for m in messages if m.HasField("frame")]


def frame_data(messages: list[pb.ServerMessage]) -> list[bytes]:
    return [m.frame.data for m in messages if m.HasField("frame")]


def events(messages: list[pb.ServerMessage], kind: pb.SessionEvent.Kind.ValueType) -> list[int]:
    """The positions in ``messages`` of events of ``kind``."""
    return [i for i, m in enumerate(messages) if m.HasField("event") and m.event.kind == kind]


def recover_summary(request: internal_pb2.RecoverRequest) -> tuple[object, ...]:
    return (
        request.session_id,
        request.worker_id,
        request.epoch,
        request.resume,
        request.resume_from,
    )


def attach_summary(attach: pb.Attach) -> tuple[object, ...]:
    return (attach.session_id, attach.resume, attach.resume_from, list(attach.controls))


# ---- the cases ----


@pytest.mark.parametrize("overlap", [0, 2], ids=["exact", "new-worker-sends-older-frames"])
async def test_broken_leg_resumes_on_the_new_worker_without_gap_or_repeat(
    stage: Stage, overlap: int
) -> None:
    a = await stage.worker("A", [breaks_after("A")])
    b = await stage.worker("B", [streams("B", overlap=overlap)])
    stage.router.placement = stage.placement(b, epoch=2)
    proxy = stage.proxy(pb.Attach(session_id=SESSION, window=8), a)

    received = await stage.run(proxy)

    resumed_at = LAST_ON_A + 1
    expected = list(range(HEAD, resumed_at + FRAMES_ON_B))
    assert frames(received) == expected  # contiguous, each once
    assert frame_data(received) == [
        f"{'A' if i <= LAST_ON_A else 'B'}:{i}".encode() for i in expected
    ]
    [recovered] = events(received, RECOVERED)
    assert received[recovered - 1].frame.frame_index == LAST_ON_A
    assert received[recovered].event.frame_index == resumed_at
    assert [recover_summary(r) for r in stage.router.requests] == [
        (SESSION, "A", 1, True, resumed_at)
    ]
    assert [attach_summary(x) for x in b.attaches] == [(SESSION, True, resumed_at, [])]
    assert b.attaches[0].window == 8
    assert len(a.attaches) == 1
    assert stage.dialed == [a.address, b.address]
    assert (proxy.placement.worker_id, proxy.placement.epoch, proxy.recoveries) == ("B", 2, 1)


async def test_controls_not_yet_delivered_are_resent_except_a_refused_one(stage: Stage) -> None:
    on_attach = [control(11, 1), control(20, 2)]
    sent = [control(12, 1), control(16, 1), control(17, 2), control(18, 9), control(19, 2)]
    refused = sent[3]
    a = await stage.worker("A", [refuses_one_then_breaks("A", len(sent), refused)])
    b = await stage.worker("B", [streams("B")])
    stage.router.placement = stage.placement(b, epoch=2)
    proxy = stage.proxy(pb.Attach(session_id=SESSION, controls=on_attach), a)
    for c in sent:
        stage.client.put_nowait(pb.ClientMessage(control=c))

    received = await stage.run(proxy)

    assert frames(received) == list(range(HEAD, LAST_ON_A + 1 + FRAMES_ON_B))
    errors = [m.error for m in received if m.HasField("error")]
    assert [(e.code_name, e.control) for e in errors] == [("INVALID_ARGUMENT", refused)]
    assert [attach_summary(x) for x in a.attaches] == [(SESSION, False, 0, on_attach)]
    # For frames > 14, in the order the client sent them: the attach's, then the stream's.
    resent = [on_attach[1], sent[1], sent[2], sent[4]]
    assert [attach_summary(x) for x in b.attaches] == [(SESSION, True, LAST_ON_A + 1, resent)]


async def test_leg_that_fails_before_attached_recovers_without_resume(stage: Stage) -> None:
    a = await stage.worker("A", [fails_at_once(grpc.StatusCode.NOT_FOUND)])
    b = await stage.worker("B", [streams("B", head=30)])
    stage.router.placement = stage.placement(b, epoch=2)
    attach = pb.Attach(session_id=SESSION, window=4, controls=[control(0, 1), control(3, 2)])
    proxy = stage.proxy(attach, a)

    received = await stage.run(proxy)

    assert [recover_summary(r) for r in stage.router.requests] == [(SESSION, "A", 1, False, 0)]
    assert a.attaches == [attach]
    assert b.attaches == [attach]  # afresh: not resumed, the original controls
    assert frames(received) == list(range(30, 30 + FRAMES_ON_B))  # from the session's head
    assert len(events(received, RECOVERED)) == 1
    assert [received[i].event.frame_index for i in events(received, ATTACHED)] == [30]


async def test_leg_that_breaks_after_attached_before_any_frame_resumes_at_the_head(
    stage: Stage,
) -> None:
    a = await stage.worker("A", [breaks_after("A", last=HEAD - 1)])  # no frame
    b = await stage.worker("B", [streams("B")])
    stage.router.placement = stage.placement(b, epoch=2)
    proxy = stage.proxy(pb.Attach(session_id=SESSION, controls=[control(12, 1)]), a)

    received = await stage.run(proxy)

    assert [recover_summary(r) for r in stage.router.requests] == [(SESSION, "A", 1, True, HEAD)]
    assert [attach_summary(x) for x in b.attaches] == [(SESSION, True, HEAD, [control(12, 1)])]
    assert frames(received) == list(range(HEAD, HEAD + FRAMES_ON_B))


async def test_worker_that_still_holds_the_session_is_attached_again_with_resume(
    stage: Stage,
) -> None:
    a = await stage.worker("A", [breaks_after("A"), streams("A")])
    b = await stage.worker("B", [])
    stage.router.placement = stage.placement(a, epoch=1)  # it still holds it
    proxy = stage.proxy(pb.Attach(session_id=SESSION), a)

    received = await stage.run(proxy)

    assert frames(received) == list(range(HEAD, LAST_ON_A + 1 + FRAMES_ON_B))
    assert len(events(received, RECOVERED)) == 1
    assert [recover_summary(r) for r in stage.router.requests] == [
        (SESSION, "A", 1, True, LAST_ON_A + 1)
    ]
    assert [attach_summary(x) for x in a.attaches] == [
        (SESSION, False, 0, []),
        (SESSION, True, LAST_ON_A + 1, []),
    ]
    assert b.attaches == []
    assert stage.dialed == [a.address, a.address]
    assert (proxy.placement.worker_id, proxy.placement.epoch) == ("A", 1)


@pytest.mark.parametrize(
    ("details", "broken"),
    [(BROKEN_LEG_DETAILS, True), ("internal error: KeyError: 'x'", False)],
    ids=["write-raced-end", "worker-bug"],
)
async def test_internal_is_a_broken_leg_only_for_grpc_cores_write_race(
    stage: Stage, details: str, broken: bool
) -> None:
    a = await stage.worker("A", [fails_at_once(grpc.StatusCode.INTERNAL, details)])
    b = await stage.worker("B", [streams("B")])
    stage.router.placement = stage.placement(b, epoch=2)
    proxy = stage.proxy(pb.Attach(session_id=SESSION), a)

    if broken:
        received = await stage.run(proxy)
        assert frames(received) == list(range(30, 30 + FRAMES_ON_B))
        assert len(stage.router.requests) == 1
    else:
        with pytest.raises(Internal, match="KeyError"):
            await stage.run(proxy)
        assert stage.router.requests == []
        assert b.attaches == []


async def test_recover_is_asked_again_while_no_worker_can_take_the_session(stage: Stage) -> None:
    a = await stage.worker("A", [breaks_after("A")])
    b = await stage.worker("B", [streams("B")])
    stage.router.placement = stage.placement(b, epoch=2)
    stage.router.unavailable = 2
    proxy = stage.proxy(pb.Attach(session_id=SESSION), a)

    received = await stage.run(proxy)

    assert frames(received) == list(range(HEAD, LAST_ON_A + 1 + FRAMES_ON_B))
    assert len(events(received, RECOVERED)) == 1
    assert [recover_summary(r) for r in stage.router.requests] == [
        (SESSION, "A", 1, True, LAST_ON_A + 1)
    ] * 3
    assert [attach_summary(x) for x in b.attaches] == [(SESSION, True, LAST_ON_A + 1, [])]


async def test_controls_sent_to_a_leg_that_failed_before_attached_reach_the_fresh_one(
    stage: Stage,
) -> None:
    """The first leg takes its Attach and a control from the stream, then fails NOT_FOUND
    before its KIND_ATTACHED: the fresh attach on the next worker gets that control too,
    after the Attach (it never reached a worker that kept it)."""
    on_stream = control(5, 2)
    got_on_b: list[pb.Control] = []

    async def reads_one_then_fails(
        attach: pb.Attach, requests: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        while not (await anext(requests)).HasField("control"):
            pass
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such session here")
        yield pb.ServerMessage()  # unreachable: makes this an async generator

    async def records_then_streams(
        attach: pb.Attach, requests: Requests, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        async with asyncio.timeout(2):
            while not got_on_b:
                message = await anext(requests)
                if message.HasField("control"):
                    got_on_b.append(message.control)
        yield event(ATTACHED, 30)
        for index in range(30, 30 + FRAMES_ON_B):
            yield frame("B", index)

    a = await stage.worker("A", [reads_one_then_fails])
    b = await stage.worker("B", [records_then_streams])
    stage.router.placement = stage.placement(b, epoch=2)
    attach = pb.Attach(session_id=SESSION, controls=[control(0, 1)])
    proxy = stage.proxy(attach, a)
    stage.client.put_nowait(pb.ClientMessage(control=on_stream))

    received = await stage.run(proxy)

    assert b.attaches == [attach] and got_on_b == [on_stream]
    assert frames(received) == list(range(30, 30 + FRAMES_ON_B))
