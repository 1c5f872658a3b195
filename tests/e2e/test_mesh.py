"""The mesh end to end: every service a separate process, real etcd and NATS."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.sdk import Client, ReceivedFrame, Session
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = DEFAULT_MODEL


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path_factory.mktemp("mesh"), workers=2) as m:
        yield m


async def _frames(session: Session, n: int, *, control_every: int = 0) -> list[ReceivedFrame]:
    out = []
    async for frame in session.frames(limit=n):
        out.append(frame)
        if control_every and frame.index % control_every == 0:
            # stamped two frames ahead: in time even on a loaded machine
            action = (frame.index // control_every) % len(session.info.model.actions)
            await session.send(action=action, frame_index=frame.index + 2)
    return out


async def test_session_streams_200_frames(mesh: Mesh) -> None:
    async with (
        Client(mesh.gateway) as client,
        client.session(MODEL, seed=11, fps=48, width=128, height=128, controls=[(0, 1)]) as session,
    ):
        frames = await _frames(session, 200, control_every=10)
        assert [f.index for f in frames] == list(range(200))
        last = frames[-1].frame
        assert (last.width, last.height, last.format) == (128, 128, pb.FRAME_FORMAT_JPEG)
        assert frames[-1].rgb().shape == (128, 128, 3)
        assert last.latency.model_ms > 0 and last.latency.encode_ms > 0
        ts = last.timestamps
        # a frame may start a little before its deadline to share a batch, never a whole
        # frame interval (48 fps: 20.8 ms) early
        assert ts.due_us - 20_800 <= ts.model_start_us <= ts.model_end_us <= ts.encoded_us
        assert ts.encoded_us <= ts.stepped_us <= ts.worker_sent_us <= ts.gateway_sent_us
        assert ts.gateway_sent_us <= frames[-1].received_us
        # the controls reached the frames they were stamped for
        assert frames[0].frame.action == 1
        n = len(session.info.model.actions)
        expected = [0, 1 % n, 1 % n, 2 % n, 3 % n, 4 % n]
        assert [frames[i].frame.action for i in (11, 12, 21, 22, 41, 42)] == expected
        # a frame with a new control says when it was sent and when the worker read it,
        # which is before its step began; a frame without one says neither
        controlled = frames[12].frame
        sent, read = controlled.control_client_time_us, controlled.timestamps.control_received_us
        assert 0 < sent <= read <= controlled.timestamps.model_start_us
        assert frames[13].frame.control_client_time_us == 0
        assert frames[13].frame.timestamps.control_received_us == 0
        assert not session.errors
        # a changing world: not 200 copies of one picture (the built-in model keeps its
        # balls moving: all 200 frames differ here; with the agent alone, as when it lost
        # its balls, ~90 did)
        assert len({f.frame.data for f in frames}) > 150
        info = await client.get_session(session.id)
        assert info.head_frame >= 200
        assert info.state == pb.SESSION_STATE_STREAMING


async def test_raw_rgb_at_native_size_is_what_the_model_made(mesh: Mesh) -> None:
    async with (
        Client(mesh.gateway) as client,
        client.session(MODEL, seed=5, format="rgb") as session,
    ):
        frames = await _frames(session, 3)
        model = session.info.model
        image = frames[0].rgb()
        assert image.shape == (model.height, model.width, 3)
        assert image.dtype == np.uint8 and image.std() > 0


async def test_same_seed_same_controls_same_frames_across_sessions(mesh: Mesh) -> None:
    async def run() -> list[bytes]:
        async with (
            Client(mesh.gateway) as client,
            client.session(
                MODEL,
                seed=99,
                format="rgb",
                output_policy="pause",
                quality="fixed",  # adaptive, a loaded machine may step one of the two down
                controls=[(i * 4, a) for i, a in enumerate([1, 1, 2, 2, 0, 2])],
            ) as session,
        ):
            return [f.frame.data for f in await _frames(session, 24)]

    first, second = await asyncio.gather(run(), run())
    assert first == second


async def test_list_models_and_health_and_reflection(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        models = await client.list_models()
    assert MODEL in [m.model_id for m in models]
    expected = {
        "gateway": "windflow.v1.Windflow",
        "router": "windflow.v1.Router",
        "session": "windflow.v1.SessionStore",
        "worker-1": "windflow.v1.Worker",
        "worker-2": "windflow.v1.Worker",
    }
    for name, service in expected.items():
        async with grpc.aio.insecure_channel(mesh.addresses[name]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for svc in ("", service):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=svc))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, svc)
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for answer in stub.ServerReflectionInfo(ask()):
                listed = {s.name for s in answer.list_services_response.service}
                assert service in listed, (name, listed)
                assert "grpc.health.v1.Health" in listed
                break


async def test_unknown_model_is_not_found(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        with pytest.raises(errors.NotFound, match="unknown model 'no-such-model'"):
            await client.create_session("no-such-model")


async def test_bad_spec_is_invalid_argument(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        with pytest.raises(errors.InvalidArgument, match="steps 9"):
            await client.create_session(MODEL, steps=9)
        with pytest.raises(errors.InvalidArgument, match="output size"):
            await client.create_session(MODEL, width=8, height=8)
        with pytest.raises(errors.InvalidArgument, match="fps"):
            await client.create_session(MODEL, fps=1000)


async def test_unknown_session_is_not_found(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        with pytest.raises(errors.NotFound):
            await client.get_session("no-such-session")
        with pytest.raises(errors.NotFound):
            await client.close_session("no-such-session")
        live = await client.attach(pb.Session(session_id="no-such-session"))
        with pytest.raises(errors.NotFound, match="no-such-session"):
            async for _ in live.frames(limit=1):
                pass
        await live.aclose()


async def test_stream_must_start_with_attach(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = windflow_pb2_grpc.WindflowStub(channel)

        async def requests() -> AsyncIterator[pb.ClientMessage]:
            yield pb.ClientMessage(control=pb.Control(frame_index=0, action=1))

        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Stream(requests()):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Attach" in (info.value.details() or "")


async def test_bad_controls_are_refused_and_the_stream_goes_on(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client, client.session(MODEL, seed=3) as session:
        n_actions = len(session.info.model.actions)
        await session.send(action=n_actions + 7, frame_index=30)  # outside the action space
        received = []
        async for frame in session.frames(limit=12):
            received.append(frame.index)
            if frame.index == 5:
                await session.send(action=1, frame_index=1)  # in the past
        assert received == list(range(12))
        codes = [(e.code_name, e.code) for e in session.errors]
        assert ("INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT.value[0]) in codes
        messages = " | ".join(e.message for e in session.errors)
        assert "outside the action space" in messages
        assert "in the past" in messages
        assert len(session.errors) == 2


async def test_oversize_message_is_resource_exhausted_others_unharmed(mesh: Mesh) -> None:
    # the bystander waits (PAUSE) while the test does not read it, so any gap is a harm
    async with (
        Client(mesh.gateway) as client,
        client.session(MODEL, seed=4, output_policy="pause") as bystander,
    ):
        before = [f.index async for f in bystander.frames(limit=3)]
        victim_info = await client.create_session(MODEL, seed=5)
        oversize = pb.ClientMessage(control=pb.Control(frame_index=10, axes=[0.0] * 400_000))
        # another client, on its own connection, with no limit of its own: the gateway
        # refuses the message and ends that stream
        async with grpc.aio.insecure_channel(mesh.gateway) as raw:
            call = windflow_pb2_grpc.WindflowStub(raw).Stream()
            await call.write(pb.ClientMessage(attach=pb.Attach(session_id=victim_info.session_id)))
            await call.write(oversize)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # through the SDK the message is refused in the client, before it takes the
        # flow-control window the client's other streams share on its connection, and its
        # own stream goes on
        victim = await client.attach(victim_info)
        with pytest.raises(errors.ResourceExhausted, match="over the gateway's limit"):
            await victim.send_raw(oversize)
        streamed = [f.index async for f in victim.frames(limit=3)]
        assert streamed == list(range(streamed[0], streamed[0] + 3))  # contiguous
        await victim.aclose()
        with pytest.raises(errors.FailedPrecondition, match="has ended"):
            await victim.send(1)  # nothing is queued on a closed stream, silently
        after = [f.index async for f in bystander.frames(limit=24)]
        assert after == list(range(before[-1] + 1, before[-1] + 25))
        # the refused streams lost nothing: the session re-attaches and streams on
        again = await client.attach(victim_info)
        frames = [f.index async for f in again.frames(limit=5)]
        assert frames == list(range(frames[0], frames[0] + 5)) and frames[0] > streamed[-1]
        await again.aclose()
        await client.close_session(victim_info.session_id)


async def test_closed_session_refuses_streams(mesh: Mesh) -> None:
    async with Client(mesh.gateway) as client:
        info = await client.create_session(MODEL)
        closed = await client.close_session(info.session_id)
        assert closed.state == pb.SESSION_STATE_CLOSED
        assert (await client.close_session(info.session_id)).state == pb.SESSION_STATE_CLOSED
        live = await client.attach(info)
        with pytest.raises(errors.FailedPrecondition, match="closed"):
            async for _ in live.frames(limit=1):
                pass
        await live.aclose()


async def test_windflow_play_json_summary(mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "run.mp4"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "windflow",
        "play",
        "--gateway",
        mesh.gateway,
        "--frames",
        "48",
        "--out",
        str(out),
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    for key in (
        "frames",
        "fps",
        "latency_ms_p50",
        "latency_ms_p99",
        "control_to_frame_ms_p50",
        "dropped",
    ):
        assert key in summary
    assert summary["frames"] == 48
    assert summary["dropped"] == 0
    assert 15 < summary["fps"] < 30
    assert out.stat().st_size > 1000
    import av

    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 48


async def test_lifecycle_events_on_nats(mesh: Mesh) -> None:
    import nats
    from nats.aio.msg import Msg

    from windflow.v1 import internal_pb2

    nc = await nats.connect(mesh.nats.url)
    seen: list[tuple[str, internal_pb2.LifecycleEvent, dict[str, str]]] = []

    async def on_message(msg: Msg) -> None:
        event = internal_pb2.LifecycleEvent.FromString(msg.data)
        seen.append((msg.subject, event, dict(msg.headers or {})))

    await nc.subscribe("windflow.v1.>", cb=on_message)
    try:
        async with Client(mesh.gateway) as client:
            info = await client.create_session(MODEL, seed=1)
            await client.close_session(info.session_id)
        for _ in range(50):
            mine = [s for s, e, _ in seen if e.session_id == info.session_id]
            if len(mine) >= 3:
                break
            await asyncio.sleep(0.05)
        assert mine == [
            "windflow.v1.session.created",
            "windflow.v1.session.placed",
            "windflow.v1.session.closed",
        ]
        placed = next(
            e for s, e, _ in seen if s.endswith("placed") and e.session_id == info.session_id
        )
        assert placed.worker_id == info.worker_id and placed.epoch == 1
    finally:
        await nc.close()
