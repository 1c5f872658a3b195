"""Browser bridge configuration."""

from __future__ import annotations

from dataclasses import dataclass

from windflow.common import grpc_util


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    gateway: str
    """The public gateway(s) it is a client of, host:port (several: comma-separated)."""
    listen: str = "127.0.0.1:0"
    """HTTP and WebSocket address, host:port."""
    max_message_bytes: int = grpc_util.PUBLIC_MAX_MESSAGE_BYTES
    """Largest WebSocket message accepted from a browser (the gateway's own limit)."""
    ice_servers: tuple[str, ...] = ()
    """The WebRTC peer connections' STUN/TURN servers (``stun:HOST:PORT``,
    ``turn:USER:CREDENTIAL@HOST:PORT``); none by default, so nothing is asked of the
    outside (aiortc's own default is a public STUN server)."""
    ice_loopback: str = "auto"
    """Offer 127.0.0.1 as a WebRTC host candidate (aioice leaves it out): ``auto`` where the
    machine has no other address, ``always``, or ``never``."""
    max_webrtc_peers: int = 64
    """Live WebRTC peer connections at most; an offer beyond is refused 429."""
    webrtc_connect_timeout_s: float = 15.0
    """A peer connection not connected this long after its answer is closed."""
    metrics_listen: str = ""
    """Where ``GET /metrics`` (Prometheus) is served, host:port; empty: nowhere."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC collector its metrics go to (traces: none from the bridge)."""
