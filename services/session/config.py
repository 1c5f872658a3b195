"""Session service configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionServiceConfig:
    etcd: str
    """etcd client address, host:port."""
    nats: str
    """NATS URL."""
    router: str = ""
    """Router address, host:port (forks are placed through it)."""
    listen: str = "127.0.0.1:0"
    otlp_endpoint: str | None = None
