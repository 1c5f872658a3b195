"""The bridge's WebRTC transport end to end (docs/browser.md, "WebRTC"): an aiortc peer
connection in the browser's role against a ``windflow up`` stack (``Stack``,
authenticating): signaling and its refusals, decoded video matched against the session's
own frames, frame metadata and controls on the data channel, and the peer connections'
lifecycle (limit, either side ending, the bridge's shutdown) on a bridge run in-process.
Real etcd, NATS and services; loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from services.bridge import webrtc
from services.bridge.config import BridgeConfig
from services.bridge.main import application
from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import logged_stack
from windflow.common import grpc_util
from windflow.infra import Stack
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPEC = {"seed": 17, "format": "rgb", "output_policy": "pause", "quality": "fixed"}
SIZE = 128  # the world model's 64x64, upscaled
RIGHT = 4  # sim.ACTIONS: noop, up, down, left, right
BAD_FIELDS: dict[str, dict[str, Any]] = {
    "bad codec": {"codec": "av1"},
    "bad role": {"role": "k"},
    "codec not offered": {"codec": "h264"},
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    webrtc.install_loopback_candidates("auto")  # (this process's peers: the page's role)
    async with logged_stack(tmp_path_factory.mktemp("bridge-webrtc"), workers=1) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def session_for(stack: Stack) -> pb.Session:
    async with Client(stack.gateway_address, token=stack.token) as client:
        return await client.create_session(
            DEFAULT_MODEL,
            width=SIZE,
            height=SIZE,
            **SPEC,  # type: ignore[arg-type]
        )


async def close(stack: Stack, *sessions: pb.Session) -> None:
    async with Client(stack.gateway_address, token=stack.token) as client:
        for session in sessions:
            with contextlib.suppress(Exception):
                await client.close_session(session.session_id)


class Page:
    """A page's side: a recvonly video transceiver and the "windflow" data channel, made
    before the offer; decoded video frames and the channel's messages collected."""

    def __init__(self, codec: str | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        video = self.pc.addTransceiver("video", direction="recvonly")
        if codec is not None:  # offer this one video codec only
            codecs = RTCRtpSender.getCapabilities("video").codecs
            video.setCodecPreferences([c for c in codecs if c.mimeType == codec])
        self.channel = self.pc.createDataChannel(webrtc.CHANNEL_LABEL)
        self.messages: list[pb.ServerMessage] = []
        self.video: list[tuple[int, np.ndarray]] = []
        """Decoded frames, with the unix time (us) each was decoded."""
        self.channel_closed = asyncio.Event()
        self.channel.on(
            "message", lambda data: self.messages.append(pb.ServerMessage.FromString(data))
        )
        self.channel.on("close", self.channel_closed.set)
        self._reader: asyncio.Task[None] | None = None

    async def offer(
        self,
        http: aiohttp.ClientSession,
        url: str,
        token: str | None,
        *,
        candidates: bool = True,
        **fields: Any,
    ) -> tuple[int, dict[str, Any]]:
        """``candidates=False``: the offer without its ICE candidates, as a browser page
        that posts it without waiting for its gathering (the bridge learns the page's
        address from its connectivity checks: peer-reflexive)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        if not candidates:
            lines = sdp.split("\r\n")
            sdp = "\r\n".join(x for x in lines if not x.startswith(("a=candidate", "a=end-of")))
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        body = {"type": "offer", "sdp": sdp, **fields}
        async with http.post(url, json=body, headers=headers) as reply:
            answer = await reply.json()
            status = reply.status
        if status == 200:
            assert answer["type"] == "answer"
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            track = self.pc.getTransceivers()[0].receiver.track
            self._reader = asyncio.create_task(self._read(track))
        return status, answer

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.VideoFrame)
                image = frame.to_ndarray(format="rgb24")
                self.video.append((time.time_ns() // 1000, image))

    def frames(self) -> list[pb.Frame]:
        return [m.frame for m in self.messages if m.HasField("frame")]

    def errors(self) -> list[pb.StreamError]:
        return [m.error for m in self.messages if m.HasField("error")]

    def send(self, message: pb.ClientMessage | bytes) -> None:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        self.channel.send(data)

    async def until(self, check: Any, within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        while not check():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def offer_url(base: str, session_id: str) -> str:
    return f"{base}v1/sessions/{session_id}/webrtc"


async def reference(stack: Stack, controls: list[tuple[int, int]], count: int) -> np.ndarray:
    """Frames 0..count-1 of a session like the tested one, over gRPC: (count, H, W, 3)."""
    session = await session_for(stack)
    async with Client(stack.gateway_address, token=stack.token) as client:
        live = await client.attach(session, controls=controls)
        frames = [f.rgb() async for f in live.frames(limit=count)]
        await live.aclose()
    await close(stack, session)
    return np.stack(frames).astype(np.float32)


async def test_video_metadata_and_a_control(stack: Stack, http: aiohttp.ClientSession) -> None:
    assert stack.bridge_url is not None
    session = await session_for(stack)
    page = Page()
    started_us = time.time_ns() // 1000
    status, _ = await page.offer(http, offer_url(stack.bridge_url, session.session_id), stack.token)
    assert status == 200
    await page.until(lambda: len(page.video) >= 10 and len(page.frames()) >= 10)
    assert all(image.shape == (SIZE, SIZE, 3) for _, image in page.video)
    # a control on the data channel, a few frames ahead: it shows in later frames' metadata
    target = page.frames()[-1].frame_index + 3
    control = pb.Control(frame_index=target, action=RIGHT, client_time_us=time.time_ns() // 1000)
    page.send(pb.ClientMessage(control=control))
    page.send(pb.ClientMessage(ack=pb.Ack(frame_index=0)))  # accepted, ignored
    await page.until(lambda: any(f.action == RIGHT for f in page.frames()))
    moved = target + 6  # (the agent moves 2 px a frame at 64x64)
    seen = len(page.video)
    await page.until(lambda: page.frames()[-1].frame_index >= moved + 12)
    await page.until(lambda: len(page.video) >= seen + 10)
    await page.aclose()
    events = [m.event for m in page.messages if m.HasField("event")]
    await close(stack, session)

    assert events and events[0].kind == pb.SessionEvent.KIND_ATTACHED
    frames = {f.frame_index: f for f in page.frames()}
    indices = [f.frame_index for f in page.frames()]
    assert indices == sorted(frames) and len(indices) >= 20  # increasing, no repeat
    assert all(not f.data and f.width == SIZE and f.timestamps.due_us for f in frames.values())
    assert frames[target].action == RIGHT
    assert frames[target].control_client_time_us == control.client_time_us
    assert all(f.action == (RIGHT if i >= target else 0) for i, f in frames.items())
    # every decoded frame is one of the session's own frames (the same seed and controls
    # over gRPC), in order, and once the agent has moved, not what it would be without the
    # control
    count = indices[-1] + 1
    ref, noop = await asyncio.gather(
        reference(stack, [(target, RIGHT)], count), reference(stack, [], count)
    )
    shown: list[int] = []
    delays_ms: list[float] = []
    bridge_ms: list[float] = []  # the gateway's send -> decoded: the bridge and WebRTC
    for decoded_us, image in page.video:
        errors = ((ref - image.astype(np.float32)) ** 2).mean(axis=(1, 2, 3))
        best = int(errors.argmin())
        assert errors[best] < 60.0, f"a decoded frame matches no session frame ({errors[best]})"
        shown.append(best)
        if best in frames:
            delays_ms.append((decoded_us - frames[best].timestamps.due_us) / 1000)
            bridge_ms.append((decoded_us - frames[best].timestamps.gateway_sent_us) / 1000)
        if best >= moved:
            away = ((noop[best] - image) ** 2).mean()
            assert away > 4 * errors[best], (best, away, errors[best])
    assert shown == sorted(set(shown)) and sum(i >= moved for i in shown) >= 5
    print(
        f"webrtc vp8 {SIZE}x{SIZE}, aiortc as the page: first frame decoded "
        f"{(page.video[0][0] - started_us) / 1000:.0f} ms after the offer was sent; frame due "
        f"-> decoded p50 {np.percentile(delays_ms, 50):.0f} ms, "
        f"p90 {np.percentile(delays_ms, 90):.0f} ms (gateway's send -> decoded p50 "
        f"{np.percentile(bridge_ms, 50):.0f} ms); {len(shown)} of {count} frames shown"
    )


async def test_h264_on_request_and_an_offer_without_candidates(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    assert stack.bridge_url is not None
    session = await session_for(stack)
    page = Page()
    url = offer_url(stack.bridge_url, session.session_id)
    status, answer = await page.offer(http, url, stack.token, candidates=False, codec="h264")
    assert status == 200 and "H264" in answer["sdp"] and "VP8" not in answer["sdp"]
    await page.until(lambda: len(page.video) >= 5)
    assert all(image.shape == (SIZE, SIZE, 3) for _, image in page.video)
    await page.aclose()
    await close(stack, session)


async def test_a_spectator_watches_a_controllers_session(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    assert stack.bridge_url is not None
    session = await session_for(stack)
    async with Client(stack.gateway_address, token=stack.token) as client:
        live = await client.attach(session)  # the controller, over gRPC
        frames = live.frames()
        await anext(frames)
        page = Page()
        url = offer_url(stack.bridge_url, session.session_id)
        assert (await page.offer(http, url, stack.token, role="spectator"))[0] == 200
        watching = asyncio.create_task(page.until(lambda: len(page.video) >= 10))
        while not watching.done():  # (the controller reads on: it paces the session)
            await asyncio.wait_for(anext(frames), 10)
        await watching
        page.send(pb.ClientMessage(control=pb.Control(frame_index=10**6, action=RIGHT)))
        await page.until(lambda: bool(page.errors()))
        await page.aclose()
        await live.aclose()
    await close(stack, session)
    attached = next(m.event for m in page.messages if m.HasField("event"))
    assert attached.kind == pb.SessionEvent.KIND_ATTACHED and attached.role == pb.ROLE_SPECTATOR
    assert page.errors()[0].code_name == "PERMISSION_DENIED"  # a spectator's control
    assert all(image.shape == (SIZE, SIZE, 3) for _, image in page.video)


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("not json", 400, "INVALID_ARGUMENT"),
        ("bad sdp", 400, "INVALID_ARGUMENT"),
        ("bad codec", 400, "INVALID_ARGUMENT"),
        ("bad role", 400, "INVALID_ARGUMENT"),
        ("codec not offered", 400, "INVALID_ARGUMENT"),
        ("unknown session", 404, "NOT_FOUND"),
        ("bad token", 401, "UNAUTHENTICATED"),
        ("no token", 401, "UNAUTHENTICATED"),
    ],
)
async def test_refusals_are_http_errors(
    stack: Stack, http: aiohttp.ClientSession, case: str, status: int, code: str
) -> None:
    assert stack.bridge_url is not None
    session = await session_for(stack)
    sid = "f" * 32 if case == "unknown session" else session.session_id
    url = offer_url(stack.bridge_url, sid)
    auth = {"Authorization": f"Bearer {stack.token}"}
    if case in ("not json", "bad sdp"):
        body = "{not json" if case == "not json" else '{"type": "offer", "sdp": "garbage"}'
        async with http.post(url, data=body, headers=auth) as reply:
            got, answer = reply.status, await reply.json()
    else:
        page = Page("video/VP8" if case == "codec not offered" else None)
        token = {"bad token": "nope", "no token": None}.get(case, stack.token)
        got, answer = await page.offer(http, url, token, **BAD_FIELDS.get(case, {}))
        await page.aclose()
    await close(stack, session)
    assert (got, answer["code"]) == (status, code), answer
    assert answer["message"]
    if case == "codec not offered":
        assert "no h264 video codec" in answer["message"]


@pytest_asyncio.fixture(loop_scope="module")
async def own_bridge(stack: Stack) -> AsyncIterator[tuple[str, web.Application, web.AppRunner]]:
    """A bridge in this process (its registry visible), at most one peer connection."""
    config = BridgeConfig(gateway=stack.gateway_address, max_webrtc_peers=1)
    channel = grpc_util.channel(config.gateway)
    app = application(config, channel)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/", app, runner
    finally:
        await runner.cleanup()
        await channel.close()


async def test_lifecycle_limit_either_side_ending_and_shutdown(
    stack: Stack,
    http: aiohttp.ClientSession,
    own_bridge: tuple[str, web.Application, web.AppRunner],
) -> None:
    base, app, runner = own_bridge
    peers = app[webrtc.PEERS]
    first, second = await session_for(stack), await session_for(stack)
    page = Page()
    assert (await page.offer(http, offer_url(base, first.session_id), stack.token))[0] == 200
    [peer] = peers
    # the limit: a second peer connection is refused while the first lives
    extra = Page()
    status, answer = await extra.offer(http, offer_url(base, second.session_id), stack.token)
    await extra.aclose()
    assert (status, answer["code"]) == (429, "RESOURCE_EXHAUSTED")
    # a malformed data-channel message: a StreamError back, and the session goes on
    await page.until(lambda: len(page.frames()) >= 3)
    page.send(b"\xff\xff\xff not protobuf")
    await page.until(lambda: bool(page.errors()))
    assert page.errors()[0].code_name == "INVALID_ARGUMENT"
    seen = page.frames()[-1].frame_index
    await page.until(lambda: page.frames()[-1].frame_index > seen + 3)
    # the page goes: its gRPC stream ends, and the slot frees
    await page.aclose()
    await page.until(lambda: not peers, within_s=10)
    assert peer._call is not None and peer._call.done()
    # the session is closed: its stream ends (KIND_CLOSED, or a status as a StreamError),
    # then the channel and the connection close
    page = Page()
    assert (await page.offer(http, offer_url(base, second.session_id), stack.token))[0] == 200
    await page.until(lambda: len(page.frames()) >= 3)
    await close(stack, second)
    await page.until(lambda: page.pc.connectionState in ("closed", "failed"), within_s=15)
    assert page.channel_closed.is_set()
    assert page.errors() or any(
        m.event.kind == pb.SessionEvent.KIND_CLOSED for m in page.messages if m.HasField("event")
    )
    await page.aclose()
    await page.until(lambda: not peers)
    # the bridge's shutdown closes every peer connection, saying why
    page = Page()
    assert (await page.offer(http, offer_url(base, first.session_id), stack.token))[0] == 200
    await page.until(lambda: len(page.frames()) >= 3)
    await runner.shutdown()
    assert not peers
    await page.until(lambda: page.pc.connectionState in ("closed", "failed"), within_s=15)
    assert [e.code_name for e in page.errors()] == ["UNAVAILABLE"]
    assert page.channel_closed.is_set()
    await page.aclose()
    await close(stack, first)
