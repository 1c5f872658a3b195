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
