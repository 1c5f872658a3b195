"""WebRTC transport of the browser bridge: one session's stream as a video track and a data
channel (docs/browser.md, "WebRTC").

Signaling is one HTTP call, ``POST /v1/sessions/{id}/webrtc`` with the page's offer; the
bridge attaches the session's gRPC ``Stream`` *before* it answers (so an unknown session or
a bad token is an HTTP error, not an answer), and answers with every candidate of its own
in the SDP (aiortc does not trickle).

- **Video**: one track, fed from the stream's frames. ``FrameTrack.recv()`` hands aiortc's
  encoder the newest frame only (VP8, or H.264 on request), with a 90 kHz pts from the
  wall clock, at most one frame per half frame interval; frames replaced before they were
  sent count as dropped.
- **Data channel** ``"windflow"`` (the page creates it before its offer): binary protobuf
  ``ClientMessage`` in (``Control``, ``Handover``; ``Ack`` accepted and ignored: the bridge
  acknowledges frames itself), binary protobuf ``ServerMessage`` out: every event and
  ``StreamError``, and for each frame sent as video, its ``Frame`` without ``data``
  (sent as the frame goes to the encoder; ``dropped_total`` includes the bridge's drops).
  A malformed message gets a ``StreamError`` INVALID_ARGUMENT back; the session goes on.
- **Ending**: a gRPC status reaches the page as a last ``StreamError``, then the channel
  and the peer connection close; a peer connection that fails, closes or does not connect
  within ``webrtc_connect_timeout_s`` ends the gRPC stream. Every live peer connection is
  in the app's registry (at most ``max_webrtc_peers``: 429 beyond); the bridge closes each
  on shutdown.
- **ICE**: the bridge's servers are ``BridgeConfig.ice_servers``, none by default, always
  passed explicitly (aiortc's default would ask a public STUN server). aioice never offers
  127.0.0.1 as a host candidate; ``install_loopback_candidates`` makes it do so where there
  is no other address (``ice_loopback="auto"``), or always.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import io
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aioice.ice
import av
import grpc
import numpy as np
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcicetransport import parse_stun_turn_uri
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from PIL import Image

from services.bridge import main as bridge
from services.bridge.config import BridgeConfig
from windflow.common import metrics
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_LABEL = "windflow"
CODECS = {"vp8": "video/VP8", "h264": "video/H264"}
ROLES = {"controller": pb.ROLE_CONTROLLER, "spectator": pb.ROLE_SPECTATOR}
VIDEO_CLOCK_HZ = 90_000
DEFAULT_FPS = 24.0
"""Pacing until the stream's KIND_ATTACHED says the session's fps."""
ATTACH_TIMEOUT_S = 15.0
MAX_QUEUED = 1024
"""Messages from the page waiting for their write to the gateway, at most (beyond: refused
with a StreamError RESOURCE_EXHAUSTED)."""
FLUSH_TIMEOUT_S = 1.0
"""How long a closing peer waits for its last messages to leave on the data channel."""


# ---- ICE ----


def ice_server(url: str) -> RTCIceServer:
    """One ``--ice-server``: ``stun:HOST[:PORT]`` or ``turn(s):[USER:CREDENTIAL@]HOST[:PORT]
    [?transport=udp|tcp]``; ValueError when aiortc could not use it."""
    scheme, _, rest = url.partition(":")
    username = credential = None
    if scheme in ("turn", "turns") and "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        username, _, credential = userinfo.partition(":")
        url = f"{scheme}:{rest}"
    try:
        parse_stun_turn_uri(url)
    except ValueError as exc:
        raise ValueError(f"bad ICE server {url!r}: {exc}") from None
    return RTCIceServer(urls=url, username=username, credential=credential)


def rtc_configuration(config: BridgeConfig) -> RTCConfiguration:
    """The bridge's peer connections' configuration: its ICE servers, explicitly (none by
    default: ``iceServers=None`` would make aiortc ask a public STUN server)."""
    return RTCConfiguration(iceServers=[ice_server(url) for url in config.ice_servers])


LOOPBACK_MODES = ("auto", "always", "never")
_aioice_host_addresses = aioice.ice.get_host_addresses
_loopback_mode = "never"


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _aioice_host_addresses(use_ipv4, use_ipv6)
    wanted = _loopback_mode == "always" or (_loopback_mode == "auto" and not addresses)
    if use_ipv4 and wanted and "127.0.0.1" not in addresses:
        addresses.append("127.0.0.1")
    return addresses


def install_loopback_candidates(mode: str) -> None:
    """aioice lists host addresses with ``aioice.ice.get_host_addresses``, which leaves out
    127.0.0.1, so in a loopback-only network a peer offers no candidate at all. This
    replaces that module function (the one place aioice's ``Connection.gather_candidates``
    looks addresses up, by its module global) with one that adds 127.0.0.1: when aioice
    found no other address (``auto``), always (``always``), or never (``never``: aioice's
    own behaviour). Process-wide; idempotent."""
    global _loopback_mode
    if mode not in LOOPBACK_MODES:
        raise ValueError(f"ice loopback mode must be one of {LOOPBACK_MODES}, not {mode!r}")
    _loopback_mode = mode
    aioice.ice.get_host_addresses = _host_addresses


# ---- video ----


def video_frame(frame: pb.Frame) -> av.VideoFrame:
    """A stream frame (RGB, or JPEG) as a video frame."""
    if frame.format == pb.FRAME_FORMAT_RGB:
        shape = (frame.height, frame.width, 3)
        array = np.frombuffer(frame.data, dtype=np.uint8).reshape(shape)
        return av.VideoFrame.from_ndarray(array, format="rgb24")
    with Image.open(io.BytesIO(frame.data)) as image:
        return av.VideoFrame.from_image(image.convert("RGB"))


WEBRTC = {"transport": "webrtc"}


class FrameTrack(MediaStreamTrack):
    """The session's frames as a video track: ``recv()`` returns the newest frame only
    (older ones are dropped, counted in ``dropped``), paced: never two within half a frame
    interval (so a burst collapses to its newest, and one frame's jitter neither delays nor
    drops the next). ``on_sent`` sees each frame's message, without its data, as the frame
    goes to the encoder."""

    kind = "video"

    def __init__(self, on_sent: Callable[[pb.Frame], None], fps: float = DEFAULT_FPS) -> None:
        super().__init__()
        self.fps = fps
        self.dropped = 0
        self.sent = 0
        self._on_sent = on_sent
        self._pending: pb.Frame | None = None
        self._arrived = asyncio.Event()
        self._start: float | None = None
        self._last_at: float | None = None
        self._last_pts = -1

    def put(self, frame: pb.Frame) -> None:
        if self._pending is not None:
            self.dropped += 1
            metrics.get().bridge_frames_dropped.add(1, WEBRTC)
        self._pending = frame
        self._arrived.set()

    def stop(self) -> None:
        super().stop()
        self._arrived.set()  # a recv() waiting ends

    async def recv(self) -> av.VideoFrame:
        if self._last_at is not None:
            wait = self._last_at + 0.5 / max(self.fps, 1e-3) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame, self._pending = self._pending, None
            if frame is not None:
                break
            self._arrived.clear()
            await self._arrived.wait()
        try:
            if frame.format == pb.FRAME_FORMAT_RGB:
                video = video_frame(frame)
            else:  # a JPEG's decode is a few ms at 720p: off the loop
                video = await asyncio.to_thread(video_frame, frame)
        except (ValueError, OSError) as exc:  # (a frame whose data does not match its size)
            log.warning("frame %d not decodable: %s", frame.frame_index, exc)
            return await self.recv()
        now = time.monotonic()
        if self._start is None:
            self._start = now
        self._last_at = now
        self._last_pts = max(self._last_pts + 1, round((now - self._start) * VIDEO_CLOCK_HZ))
        video.pts = self._last_pts
        video.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
        frame.ClearField("data")
        frame.dropped_total += self.dropped
        self.sent += 1
        self._on_sent(frame)
        return video


# ---- one peer connection ----


class Refused(Exception):
    """An offer the bridge answers with an HTTP error instead of an SDP answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _error(status: int, code: str, message: str) -> Refused:
    return Refused(web.json_response({"code": code, "message": message}, status=status))


@dataclass(frozen=True, slots=True)
class Offer:
    """The signaling request's body."""

    sdp: str
    role: pb.Role.ValueType = pb.ROLE_CONTROLLER
    resume_from: int | None = None
    window: int = 0
    codec: str = "vp8"

    @classmethod
    def parse(cls, body: Any) -> Offer:
        """ValueError, with the reason, for a body that is not a valid offer."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        if body.get("type") != "offer":
            raise ValueError('"type" must be "offer"')
        sdp = body.get("sdp")
        if not isinstance(sdp, str) or not sdp.strip():
            raise ValueError('"sdp" must be the offer\'s SDP')
        role = body.get("role", "controller")
        if role not in ROLES:
            raise ValueError(f'"role" must be one of {sorted(ROLES)}')
        resume_from = body.get("resume_from")
        if resume_from is not None and not _natural(resume_from):
            raise ValueError('"resume_from" must be a frame index (an integer >= 0)')
        window = body.get("window", 0)
        if not _natural(window) or window > 64:
            raise ValueError('"window" must be an integer in 0..64')
        codec = body.get("codec", "vp8")
        if codec not in CODECS:
            raise ValueError(f'"codec" must be one of {sorted(CODECS)}')
        return cls(sdp, ROLES[role], resume_from, window, codec)

    def attach(self, session_id: str) -> pb.Attach:
        attach = pb.Attach(session_id=session_id, window=self.window, role=self.role)
        if self.resume_from is not None:
            attach.resume = True
            attach.resume_from = self.resume_from
        return attach


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _stream_error(code: grpc.StatusCode, message: str) -> pb.StreamError:
    return pb.StreamError(code=code.value[0], code_name=code.name, message=message)


class Peer:
    """One page's peer connection and the session stream behind it.

    Lifecycle: ``Peer(...)`` -> ``await answer(offer, session_id)`` (the SDP answer; raises
    ``Refused`` or ``grpc.aio.AioRpcError`` when the offer or the attach is refused: then
    ``await aclose()``) -> runs on its own -> ``end(error)`` / ``await aclose()``, by either
    side or the bridge's shutdown; it leaves ``registry`` when closed."""

    def __init__(
        self,
        config: BridgeConfig,
        stub: windflow_pb2_grpc.WindflowStub,
        metadata: Sequence[tuple[str, str]],
        registry: set[Peer],
    ) -> None:
        self._config = config
        self._stub = stub
        self._metadata = tuple(metadata)
        self._registry = registry
        self.pc = RTCPeerConnection(rtc_configuration(config))
        self.track = FrameTrack(self._frame_sent)
        self.session_id = ""
        self._call: grpc.aio.StreamStreamCall | None = None
        self._channel: RTCDataChannel | None = None
        self._early: deque[pb.ServerMessage] = deque(maxlen=256)
        """Messages for the page before its data channel opened."""
        self._to_gateway: asyncio.Queue[pb.ClientMessage] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._ending: asyncio.Task[None] | None = None
        self.pc.on("connectionstatechange", self._connection_changed)
        self.pc.on("datachannel", self._channel_opened)

    # -- start --

    async def answer(self, offer: Offer, session_id: str) -> str:
        self.session_id = session_id
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences(
            [c for c in codecs if c.mimeType.lower() == CODECS[offer.codec].lower()]
        )
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        except OperationError as exc:  # no codec in common
            reason = f"the offer has no {offer.codec} video codec ({exc})"
            raise _error(400, "INVALID_ARGUMENT", reason) from None
        except Exception as exc:  # aiortc's SDP parser raises what a bad line makes it raise
            reason = f"the offer's SDP does not parse: {exc}"
            raise _error(400, "INVALID_ARGUMENT", reason) from None
        if transceiver.mid is None:
            raise _error(400, "INVALID_ARGUMENT", "the offer has no video (m=video) to answer")
        await self._attach(offer.attach(session_id))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._tasks = [
            asyncio.create_task(self._from_gateway(), name="webrtc:from-gateway"),
            asyncio.create_task(self._write_gateway(), name="webrtc:to-gateway"),
            asyncio.create_task(self._connect_deadline(), name="webrtc:connect-deadline"),
        ]
        return self.pc.localDescription.sdp

    async def _attach(self, attach: pb.Attach) -> None:
        """The session's stream, attached, or the refusal (AioRpcError)."""
        # the token first (one unary call): a stream refused at its start races the Attach's
        # write, and grpc-python may report that race rather than the status (relay.py)
        await self._stub.ListModels(
            pb.ListModelsRequest(), metadata=self._metadata, timeout=ATTACH_TIMEOUT_S
        )
        self._call = self._stub.Stream(metadata=self._metadata)
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.write(pb.ClientMessage(attach=attach))  # (its status: the read)
        try:
            first = await asyncio.wait_for(self._call.read(), ATTACH_TIMEOUT_S)
        except TimeoutError:
            raise _error(504, "DEADLINE_EXCEEDED", "the session did not attach in time") from None
        if first is grpc.aio.EOF:
            raise _error(502, "UNAVAILABLE", "the session's stream ended before it attached")
        self._from_stream(first)

    # -- gRPC side --

    async def _from_gateway(self) -> None:
        assert self._call is not None
        error: pb.StreamError | None = None
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                self._from_stream(message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                error = _stream_error(exc.code(), exc.details() or exc.code().name)
        self.end(error)

    def _from_stream(self, message: pb.ServerMessage) -> None:
        if message.HasField("frame"):
            self.track.put(message.frame)
            # the bridge acks frames as it takes them, in either role (a spectator's acks
            # pace its own stream)
            ack = pb.Ack(frame_index=message.frame.frame_index)
            self._to_gateway.put_nowait(pb.ClientMessage(ack=ack))
            return
        event, kinds = message.event, pb.SessionEvent
        if event.kind in (kinds.KIND_ATTACHED, kinds.KIND_QUALITY_CHANGED) and event.fps:
            self.track.fps = event.fps
        self._send(message)

    async def _write_gateway(self) -> None:
        """Controls and acks, in order; never dropped."""
        assert self._call is not None
        while True:
            message = await self._to_gateway.get()
            try:
                await self._call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the stream ended: its status comes from the read side

    # -- page side --

    def _connection_changed(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.end()

    async def _connect_deadline(self) -> None:
        await asyncio.sleep(self._config.webrtc_connect_timeout_s)
        if self.pc.connectionState != "connected":
            log.info("webrtc peer of %s: not connected in time", self.session_id)
            self.end()

    def _channel_opened(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL or self._channel is not None:
            channel.close()
            return
        self._channel = channel
        channel.on("message", self._from_page)
        while self._early:
            self._send(self._early.popleft())

    def _from_page(self, data: str | bytes) -> None:
        message = pb.ClientMessage()
        try:
            if isinstance(data, str):
                json_format.Parse(data, message)  # JSON text, for debugging
            else:
                message.ParseFromString(data)
        except (json_format.ParseError, DecodeError, ValueError) as exc:
            self._refuse(f"malformed ClientMessage: {exc}")
            return
        if message.HasField("ack"):
            return  # the bridge acknowledges frames itself
        if message.HasField("control") or message.HasField("handover"):
            if self._to_gateway.qsize() >= MAX_QUEUED:  # (a page flooding the channel)
                error = _stream_error(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many messages waiting for the gateway"
                )
                error.control.CopyFrom(message.control)
                self._send(pb.ServerMessage(error=error))
                return
            self._to_gateway.put_nowait(message)  # in order
        elif message.HasField("attach"):
            self._refuse("the stream is attached by the offer: no Attach on the data channel")
        else:
            self._refuse("empty ClientMessage")

    def _refuse(self, reason: str) -> None:
        self._send(pb.ServerMessage(error=_stream_error(grpc.StatusCode.INVALID_ARGUMENT, reason)))

    def _frame_sent(self, frame: pb.Frame) -> None:
        self._send(pb.ServerMessage(frame=frame))

    def _send(self, message: pb.ServerMessage) -> None:
        channel = self._channel
        if channel is None:
            self._early.append(message)
        elif channel.readyState == "open":
            channel.send(message.SerializeToString())

    # -- ending --

    def end(self, error: pb.StreamError | None = None) -> asyncio.Task[None]:
        """Close it (once): ``error`` to the page first, when it says why."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._close(error))
        return self._ending

    async def aclose(self) -> None:
        await self.end()

    async def _close(self, error: pb.StreamError | None) -> None:
        try:
            if error is not None:
                self._send(pb.ServerMessage(error=error))
            await self._flush()
        finally:
            if self._call is not None:
                self._call.cancel()
            current = asyncio.current_task()
            tasks = [task for task in self._tasks if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.track.stop()
            await self.pc.close()
            self._registry.discard(self)
            log.log(
                logging.INFO if self._tasks else logging.DEBUG,  # (DEBUG: never answered)
                "webrtc peer of %s closed: %d frames sent, %d dropped by the bridge%s",
                self.session_id,
                self.track.sent,
                self.track.dropped,
                f" ({error.code_name}: {error.message})" if error is not None else "",
            )

    async def _flush(self) -> None:
        """The data channel's last messages delivered before the connection goes: the
        channel is closed (a stream reset, which SCTP sends after the data queued before
        it) and its close awaited, briefly."""
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        closed = asyncio.Event()
        channel.on("close", closed.set)
        channel.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), FLUSH_TIMEOUT_S)


# ---- HTTP ----

PEERS: web.AppKey[set[Peer]] = web.AppKey("webrtc_peers")
CONFIG: web.AppKey[BridgeConfig] = web.AppKey("webrtc_config")


async def offer(request: web.Request) -> web.Response:
    """``POST /v1/sessions/{session_id}/webrtc``: the page's offer in, the answer out."""
    try:
        parsed = Offer.parse(json.loads(await request.text()))
    except ValueError as exc:  # (json's errors are ValueErrors)
        return web.json_response({"code": "INVALID_ARGUMENT", "message": str(exc)}, status=400)
    config = request.app[CONFIG]
    peers = request.app[PEERS]
    if len(peers) >= config.max_webrtc_peers:
        message = f"the bridge holds {len(peers)} peer connections, its limit"
        return web.json_response({"code": "RESOURCE_EXHAUSTED", "message": message}, status=429)
    peer = Peer(config, request.app[bridge.STUB], bridge.credentials(request), peers)
    peers.add(peer)
    try:
        sdp = await peer.answer(parsed, request.match_info["session_id"])
    except Refused as exc:
        await peer.aclose()
        return exc.response
    except grpc.aio.AioRpcError as exc:
        await peer.aclose()
        return bridge._refused(exc)
    except BaseException:
        await peer.aclose()
        raise
    return web.json_response({"type": "answer", "sdp": sdp})


async def _close_all(app: web.Application) -> None:
    bye = _stream_error(grpc.StatusCode.UNAVAILABLE, "the bridge is shutting down")
    peers = app[PEERS]
    await asyncio.gather(*(peer.end(bye) for peer in list(peers)), return_exceptions=True)


def setup(app: web.Application, config: BridgeConfig) -> None:
    """The signaling route, the peer registry and its closing on shutdown."""
    install_loopback_candidates(config.ice_loopback)
    for url in config.ice_servers:
        ice_server(url)  # (a bad one fails here, at start)
    app[CONFIG] = config
    app[PEERS] = set()
    app.on_shutdown.append(_close_all)
    app.router.add_post("/v1/sessions/{session_id}/webrtc", offer)
