"""The bridge's WebRTC pieces without a mesh (services/bridge/webrtc.py): ICE configuration
(no STUN server unless configured), aioice's loopback candidate, the offer's validation,
and the video track (newest frame only, drops counted, 90 kHz pts, metadata without data)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import aioice.ice
import ifaddr
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcicetransport import connection_kwargs
from PIL import Image

from services.bridge import webrtc
from services.bridge.config import BridgeConfig
from windflow.v1 import windflow_pb2 as pb


def test_default_config_has_no_ice_server() -> None:
    configuration = webrtc.rtc_configuration(BridgeConfig(gateway="127.0.0.1:1"))
    # [] and not None: None is aiortc's cue for its default, a public STUN server
    assert configuration.iceServers == []
    assert connection_kwargs(configuration.iceServers) == {}


def test_configured_ice_servers() -> None:
    config = BridgeConfig(
        gateway="127.0.0.1:1",
        ice_servers=("stun:stun.example:3478", "turn:alice:s3cret@turn.example:3478"),
    )
    kwargs = connection_kwargs(webrtc.rtc_configuration(config).iceServers or [])
    assert kwargs["stun_server"] == ("stun.example", 3478)
    assert kwargs["turn_server"] == ("turn.example", 3478)
    assert (kwargs["turn_username"], kwargs["turn_password"]) == ("alice", "s3cret")
    with pytest.raises(ValueError, match="bad ICE server"):
        webrtc.ice_server("http://example")


@pytest.fixture
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine whose one interface is lo, and aioice's own address lookup (whatever
    another test installed), restored afterwards."""
    lo = ifaddr.Adapter(
        "lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo"), ifaddr.IP(("::1", 0, 0), 128, "lo")]
    )
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: [lo])
    monkeypatch.setattr(aioice.ice, "get_host_addresses", webrtc._aioice_host_addresses)
    monkeypatch.setattr(webrtc, "_loopback_mode", webrtc._loopback_mode)
    yield


def test_loopback_candidate_modes(only_loopback: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert aioice.ice.get_host_addresses(True, True) == []  # aioice's own: nothing to offer
    webrtc.install_loopback_candidates("never")
    assert aioice.ice.get_host_addresses(True, True) == []
    webrtc.install_loopback_candidates("auto")
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(False, True) == []
    eth = ifaddr.Adapter("eth0", "eth0", [ifaddr.IP("192.0.2.2", 24, "eth0")])
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: [eth])
    assert aioice.ice.get_host_addresses(True, False) == ["192.0.2.2"]  # auto: not needed
    webrtc.install_loopback_candidates("always")
    assert aioice.ice.get_host_addresses(True, False) == ["192.0.2.2", "127.0.0.1"]
    with pytest.raises(ValueError):
        webrtc.install_loopback_candidates("sometimes")


async def test_two_peers_connect_over_loopback_only(only_loopback: None) -> None:
    webrtc.install_loopback_candidates("auto")
    offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    received: asyncio.Queue[Any] = asyncio.Queue()
    answerer.on("datachannel", lambda channel: channel.on("message", received.put_nowait))
    channel = offerer.createDataChannel("windflow")
    channel.on("open", lambda: channel.send(b"over 127.0.0.1"))
    try:
        await offerer.setLocalDescription(await offerer.createOffer())
        assert "127.0.0.1" in offerer.localDescription.sdp
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        assert await asyncio.wait_for(received.get(), 10) == b"over 127.0.0.1"
    finally:
        await offerer.close()
        await answerer.close()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "JSON object"),
        ({"type": "answer", "sdp": "v=0"}, '"type"'),
        ({"type": "offer"}, '"sdp"'),
        ({"type": "offer", "sdp": "v=0", "role": "king"}, '"role"'),
        ({"type": "offer", "sdp": "v=0", "resume_from": -1}, '"resume_from"'),
        ({"type": "offer", "sdp": "v=0", "resume_from": True}, '"resume_from"'),
        ({"type": "offer", "sdp": "v=0", "window": 65}, '"window"'),
        ({"type": "offer", "sdp": "v=0", "codec": "av1"}, '"codec"'),
    ],
)
def test_bad_offers(body: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        webrtc.Offer.parse(body)


def test_an_offer_becomes_the_attach() -> None:
    offer = webrtc.Offer.parse(
        {"type": "offer", "sdp": "v=0", "role": "spectator", "resume_from": 7, "window": 4}
    )
    attach = offer.attach("s1")
    assert (attach.session_id, attach.role, attach.window) == ("s1", pb.ROLE_SPECTATOR, 4)
    assert attach.resume and attach.resume_from == 7
    plain = webrtc.Offer.parse({"type": "offer", "sdp": "v=0"})
    assert (plain.codec, plain.role, plain.attach("s1").resume) == (
        "vp8",
        pb.ROLE_CONTROLLER,
        False,
    )


def rgb_frame(index: int, value: int, size: tuple[int, int] = (4, 6)) -> pb.Frame:
    h, w = size
    data = np.full((h, w, 3), value, dtype=np.uint8).tobytes()
    return pb.Frame(
        frame_index=index, format=pb.FRAME_FORMAT_RGB, width=w, height=h, data=data, dropped_total=2
    )


def test_frames_become_video_frames() -> None:
    video = webrtc.video_frame(rgb_frame(0, 200))
    assert (video.width, video.height) == (6, 4)
    assert (video.to_ndarray(format="rgb24") == 200).all()
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(out, format="JPEG", quality=95)
    jpeg = pb.Frame(format=pb.FRAME_FORMAT_JPEG, width=8, height=6, data=out.getvalue())
    decoded = webrtc.video_frame(jpeg).to_ndarray(format="rgb24")
    assert decoded.shape == (6, 8, 3) and abs(int(decoded[..., 2].mean()) - 30) <= 3


async def test_the_track_sends_the_newest_frame_and_counts_drops() -> None:
    sent: list[pb.Frame] = []
    track = webrtc.FrameTrack(sent.append, fps=1000.0)
    for index in range(3):
        track.put(rgb_frame(index, index))
    first = await track.recv()
    assert (first.to_ndarray(format="rgb24") == 2).all()  # the newest: 0 and 1 dropped
    assert track.dropped == 2
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # nothing new: it waits
    track.put(rgb_frame(3, 3))
    second = await asyncio.wait_for(waiting, 1)
    assert first.pts is not None and second.pts is not None and second.pts > first.pts
    assert second.time_base is not None and second.time_base.denominator == 90_000
    assert [f.frame_index for f in sent] == [2, 3]
    assert all(not f.data for f in sent)  # metadata only
    assert [f.dropped_total for f in sent] == [4, 4]  # the worker's 2 + the bridge's 2
    track.stop()


async def test_the_track_paces_at_the_session_fps() -> None:
    track = webrtc.FrameTrack(lambda frame: None, fps=20.0)  # 50 ms a frame
    track.put(rgb_frame(0, 0))
    first = await track.recv()
    track.put(rgb_frame(1, 1))
    second = await track.recv()  # at least half a frame interval later
    assert first.pts is not None and second.pts is not None
    assert (second.pts - first.pts) / 90_000 >= 0.024
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    track.stop()
    with pytest.raises(webrtc.MediaStreamError):
        await asyncio.wait_for(waiting, 1)
