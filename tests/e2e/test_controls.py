"""Controls beyond actions through the whole mesh (issue 23, docs/controls.md): a prompt
switch on the tiny Wan, camera poses on the tiny Matrix-Game, frames in to the built-in
restyle model. Each kind is declared in ListModels, refused with the field named when bad
(the session goes on), and replayed, forked and recovered bit-exactly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio

from tests.e2e.mesh import Mesh
from windflow import errors
from windflow.cli.play import VideoWriter, parse_prompts, play
from windflow.common import grpc_util
from windflow.sdk import Client, ReceivedFrame
from windflow.sdk.client import input_frame, make_control
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT_MODEL = "wan-causal-tiny"
POSE_MODEL = "matrix-game-2-tiny"
V2V_MODEL = "windflow-restyle"
MODELS = ("windflow-world", PROMPT_MODEL, POSE_MODEL, V2V_MODEL)
WORKER_ARGS = (
    "--models",
    ",".join(MODELS),
    "--lease-ttl",
    "2",
    "--heartbeat",
    "0.5",
    "--checkpoint-every",
    "16",
)
# raw RGB (frames compare by pixel), paced, fixed quality (no adaptive step changes)
SPEC: dict[str, object] = {"format": "rgb", "fps": 12.0, "quality": "fixed"}
FRAMES = 36
FORK_AT = 20


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    # one worker; the recovery test (last) adds the one its sessions move to
    async with Mesh(tmp_path_factory.mktemp("controls"), workers=1, worker_args=WORKER_ARGS) as m:
        yield m


@pytest_asyncio.fixture(loop_scope="module")
async def client(mesh: Mesh) -> AsyncIterator[Client]:
    async with Client(mesh.gateway) as c:
        yield c


def picture(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


Script = Callable[[pb.Session, int], dict[str, Any] | None]
"""What a session is sent for a frame: ``Session.send`` arguments, or None."""


def prompts(info: pb.Session, index: int) -> dict[str, Any] | None:
    """A prompt from the start, a switch at frame 9 (mid-chunk) and another at 14."""
    texts = {0: "a red fox in snow", 9: "a lighthouse at night", 14: ""}
    return {"prompt": texts[index]} if index in texts else None


def poses(info: pb.Session, index: int) -> dict[str, Any] | None:
    shares = {0: 0.5, 5: -1.0, 12: 0.25}
    if index not in shares:
        return None
    pose = [shares[index] * c.max for c in info.model.controls.pose.components]
    return {"action": 1 + index % 4, "pose": pose}


def frames_in(info: pb.Session, index: int) -> dict[str, Any] | None:
    """A new input frame at most frames, JPEG or raw; none at some (the last stays)."""
    if index >= FORK_AT or index % 3 == 2:
        return None
    spec = info.model.controls.input_frame
    rgb = picture(index, spec.width, spec.height)
    fmt = pb.FRAME_FORMAT_JPEG if index % 2 else pb.FRAME_FORMAT_RGB
    return {"action": index % 4, "frame": input_frame(rgb, fmt)}


SCRIPTS: dict[str, tuple[str, Script]] = {
    "prompt": (PROMPT_MODEL, prompts),
    "pose": (POSE_MODEL, poses),
    "frames": (V2V_MODEL, frames_in),
}
AHEAD = 4
"""Each control is sent this many frames ahead of its frame (the first with the attach)."""


async def run(
    client: Client,
    info: pb.Session,
    script: Script | None,
    frames: int = FRAMES,
    at_frame: Callable[[int], Awaitable[None]] | None = None,
) -> list[ReceivedFrame]:
    """``frames`` frames of the session, the script's controls sent ``AHEAD`` frames
    before theirs (those of the first frames with the attach); refusals fail the test."""
    start = info.head_frame
    initial = []
    for index in range(start, min(start + AHEAD, frames)):
        kinds = script(info, index) if script is not None else None
        if kinds is not None:
            initial.append(make_control(index, **kinds))
    live = await client.attach(info, window=16, controls=initial)
    got: list[ReceivedFrame] = []
    async for frame in live.frames(limit=frames - start):
        got.append(frame)
        ahead = frame.index + AHEAD
        kinds = script(info, ahead) if script is not None and ahead < frames else None
        if kinds is not None:
            await live.send(frame_index=ahead, **kinds)
        if at_frame is not None:
            await at_frame(frame.index)
    await live.aclose()
    assert not live.errors, [e.message for e in live.errors]
    return got


async def replayed(client: Client, session_id: str, upto: int) -> list[bytes]:
    return [f.frame.data async for f in client.replay(session_id, 0, upto)]


async def test_list_models_declares_each_kind(client: Client) -> None:
    served = {m.model_id: m.controls for m in await client.list_models()}
    assert served[PROMPT_MODEL].prompt.max_chars > 0
    assert not served[PROMPT_MODEL].HasField("pose")
    pose = served[POSE_MODEL].pose
    assert pose.kind == pb.POSE_KIND_VELOCITY and [c.name for c in pose.components] == [
        "pitch",
        "yaw",
    ]
    frames = served[V2V_MODEL].input_frame
    assert frames.width > 0 and frames.fps > 0 and frames.queue >= 1
    assert frames.max_bytes >= frames.width * frames.height * 3
    assert not served[V2V_MODEL].HasField("prompt")
    plain = served["windflow-world"]
    assert list(plain.actions) and not plain.HasField("input_frame")


@pytest.mark.parametrize("kind", sorted(SCRIPTS))
async def test_each_kind_replays_and_forks_bit_exactly(client: Client, kind: str) -> None:
    model, script = SCRIPTS[kind]
    info = await client.create_session(model, seed=11, **SPEC)  # type: ignore[arg-type]
    got = await run(client, info, script)
    assert [f.index for f in got] == list(range(FRAMES))
    data = [f.frame.data for f in got]
    assert await replayed(client, info.session_id, FRAMES) == data
    # the controls changed the frames: the same seed with none of them differs
    plain = await client.create_session(model, seed=11, **SPEC)  # type: ignore[arg-type]
    unscripted = await run(client, plain, None)
    assert [f.frame.data for f in unscripted] != data
    # a fork keeps what was in effect at its frame (the prompt, pose, input frame): no
    # control is sent after FORK_AT - 4, so its frames are the parent's
    fork = await client.fork(info.session_id, FORK_AT)
    forked = await run(client, fork, None)
    assert [f.frame.data for f in forked] == data[FORK_AT:]
    for s in (info, plain, fork):
        await client.close_session(s.session_id)


async def test_bad_input_is_refused_naming_the_field_and_the_session_goes_on(
    client: Client,
) -> None:
    info = await client.create_session(V2V_MODEL, seed=2, **SPEC)  # type: ignore[arg-type]
    spec = info.model.controls.input_frame
    live = await client.attach(info)
    frames: list[ReceivedFrame] = []

    async def pump() -> None:
        async for frame in live.frames():
            frames.append(frame)

    def sized(data: bytes) -> pb.InputFrame:
        return pb.InputFrame(data=data, width=spec.width, height=spec.height)

    reader = asyncio.create_task(pump())
    try:
        wrong_size = input_frame(picture(1, spec.width + 8, spec.height))
        corrupt = input_frame(picture(2, spec.width, spec.height))
        corrupt.data = corrupt.data[:40] + b"\x00" * 64
        bad: list[tuple[dict[str, object], type[errors.WindflowError], str]] = [
            ({"prompt": "a fox"}, errors.InvalidArgument, "control.prompt"),
            ({"pose": [0.0, 0.0]}, errors.InvalidArgument, "control.pose"),
            ({"frame": wrong_size}, errors.InvalidArgument, "control.frame"),
            ({"frame": corrupt}, errors.InvalidArgument, "JPEG"),
            (
                {
                    "frame": pb.InputFrame(
                        data=b"\xff" * (spec.max_bytes + 1), width=spec.width, height=spec.height
                    )
                },
                errors.ResourceExhausted,
                "control.frame.data",
            ),
        ]
        for kinds, error, field in bad:
            with pytest.raises(error) as refused:
                await live.send_confirmed(frame_index=live.next_index + 8, **kinds)  # type: ignore[arg-type]
            assert field in str(refused.value)
        good = await live.send_confirmed(
            1, frame_index=live.next_index + 8, frame=picture(3, spec.width, spec.height)
        )
        # over the gateway's message limit: refused by the SDK before it is sent
        huge = pb.InputFrame(
            data=bytes(grpc_util.PUBLIC_MAX_MESSAGE_BYTES), width=spec.width, height=spec.height
        )
        with pytest.raises(errors.ResourceExhausted, match="not sent"):
            await live.send(frame=huge)
        for _ in range(500):
            if frames and frames[-1].index > good.frame_index + 2:
                break
            await asyncio.sleep(0.01)
        assert frames[-1].index > good.frame_index + 2  # the session went on
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await live.aclose()
    # a prompt to the prompt model over its limit, a pose with NaN to the posed one
    checks: list[tuple[str, dict[str, object], str]] = [
        (PROMPT_MODEL, {"prompt": "x" * 10_000}, "control.prompt"),
        (POSE_MODEL, {"pose": [0.0, float("nan")]}, "control.pose.yaw"),
    ]
    for model, kinds, field in checks:
        other = await client.create_session(model, seed=2, **SPEC)  # type: ignore[arg-type]
        live = await client.attach(other)
        reader = asyncio.create_task(pump())
        try:
            with pytest.raises(errors.InvalidArgument, match=field.replace(".", r"\.")):
                await live.send_confirmed(frame_index=live.next_index + 8, **kinds)  # type: ignore[arg-type]
            await live.send_confirmed(0, frame_index=live.next_index + 8)  # and it goes on
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await live.aclose()
            await client.close_session(other.session_id)
    await client.close_session(info.session_id)


async def test_the_gateway_refuses_an_oversize_message_and_the_session_survives(
    mesh: Mesh, client: Client
) -> None:
    """A client past the SDK (any gRPC client) sends a frame over the public limit: the
    gateway ends that stream RESOURCE_EXHAUSTED; the session is kept and resumes."""
    info = await client.create_session(V2V_MODEL, seed=4, **SPEC)  # type: ignore[arg-type]
    first = await run(client, info, None, frames=6)
    head = first[-1].index + 1
    oversize = pb.ClientMessage(
        control=pb.Control(
            frame_index=head + 20,
            frame=pb.InputFrame(data=bytes(grpc_util.PUBLIC_MAX_MESSAGE_BYTES + 1)),
        )
    )

    async def messages() -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(
            attach=pb.Attach(session_id=info.session_id, resume=True, resume_from=head)
        )
        yield oversize

    call = client.stub.Stream(messages(), metadata=client.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in call:
            pass
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = await client.get_session(info.session_id)
    resumed = await client.attach(after, resume_from=after.head_frame)
    async for frame in resumed.frames(limit=3):
        assert frame.index >= after.head_frame
    await resumed.aclose()
    await client.close_session(info.session_id)


async def test_sessions_of_every_kind_recover_bit_exactly_from_a_killed_worker(
    mesh: Mesh, client: Client
) -> None:
    """kill -9 the worker under a prompt-switching, a posed and a frames-in session on it
    mid-stream: each continues on the other worker with no gap, and every frame it got
    equals what Replay re-renders from the log (prompts, poses and input frames
    included)."""
    spec = {**SPEC, "fps": 6.0}  # three models on one worker of a 2-core machine
    sessions = {
        kind: await client.create_session(model, seed=21, **spec)  # type: ignore[arg-type]
        for kind, (model, _) in SCRIPTS.items()
    }
    victims = {(await client.get_session(s.session_id)).worker_id for s in sessions.values()}
    assert victims == {"worker-1"}
    await mesh.add_worker().wait_ready()  # where they go
    killed = asyncio.Event()

    async def kill_at(index: int) -> None:
        if index == 24 and not killed.is_set():
            killed.set()
            for worker in victims:
                mesh.kill(worker)

    runs = [
        run(
            client,
            info,
            SCRIPTS[kind][1],
            frames=48,
            at_frame=kill_at if kind == "frames" else None,
        )
        for kind, info in sessions.items()
    ]
    results = await asyncio.gather(*runs)
    assert killed.is_set()
    for (kind, info), got in zip(sessions.items(), results, strict=True):
        assert [f.index for f in got] == list(range(48)), kind
        after = await client.get_session(info.session_id)
        assert after.worker_id not in victims, kind
        assert await replayed(client, info.session_id, 48) == [f.frame.data for f in got], kind
        await client.close_session(info.session_id)


async def test_play_switches_prompts_and_feeds_a_video_through_the_mesh(
    mesh: Mesh, tmp_path: Path
) -> None:
    """``windflow play --model wan-causal-tiny --prompt ... --prompt-at ...`` and
    ``windflow play --model windflow-restyle --input VIDEO`` (their code: ``play``)."""
    summary = await play(
        mesh.gateway,
        model=PROMPT_MODEL,
        frames=30,
        fps=6.0,
        prompts=parse_prompts("a red fox in snow", ["12:a lighthouse at night"]),
    )
    assert (summary.frames, summary.prompts_sent, summary.refused_controls) == (30, 2, 0)
    clip = tmp_path / "clip.mp4"
    writer = VideoWriter(str(clip), 24.0, 64, 48)
    for t in range(10):
        writer.write(picture(t, 64, 48))
    writer.close()
    summary = await play(mesh.gateway, model=V2V_MODEL, frames=24, fps=12.0, input_spec=str(clip))
    assert summary.frames == 24 and summary.refused_controls == 0
    assert summary.input_frames_sent >= 24  # one per frame, the 10-frame clip looped


async def test_sessions_of_every_kind_migrate_live_bit_exactly(mesh: Mesh, client: Client) -> None:
    """A prompt-switching, a posed and a frames-in session each move live to another worker
    mid-stream (the target replays the log, the input frames read from the object store):
    no gap, one KIND_MIGRATED, and every frame equal to Replay's."""
    await mesh.add_worker().wait_ready()  # two live workers (the recovery test killed one)
    spec = {**SPEC, "fps": 6.0}
    sessions = {
        kind: await client.create_session(model, seed=31, **spec)  # type: ignore[arg-type]
        for kind, (model, _) in SCRIPTS.items()
    }
    live_workers = [n for n, p in mesh.procs.items() if n.startswith("worker-") and p.running]
    channel = grpc_util.channel(mesh.addresses["router"])
    router = internal_pb2_grpc.RouterStub(channel)
    moves: dict[str, internal_pb2.MigrationResult] = {}

    def mover(kind: str, info: pb.Session) -> Callable[[int], Awaitable[None]]:
        async def at_frame(index: int) -> None:
            if index == 20 and kind not in moves:
                to = next(w for w in live_workers if w != info.worker_id)
                moves[kind] = await router.Migrate(
                    internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id=to)
                )

        return at_frame

    try:
        runs = [
            run(client, info, SCRIPTS[k][1], frames=48, at_frame=mover(k, info))
            for k, info in sessions.items()
        ]
        results = await asyncio.gather(*runs)
    finally:
        await channel.close()
    for (kind, info), got in zip(sessions.items(), results, strict=True):
        assert [f.index for f in got] == list(range(48)), kind
        assert moves[kind].from_worker_id == info.worker_id, kind
        after = await client.get_session(info.session_id)
        assert after.worker_id == moves[kind].to_worker_id != info.worker_id, kind
        assert await replayed(client, info.session_id, 48) == [f.frame.data for f in got], kind
        await client.close_session(info.session_id)
