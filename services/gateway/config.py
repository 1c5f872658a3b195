"""Gateway configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from windflow.common import grpc_util


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits, whatever its tokens say (0: none)."""

    max_sessions: int = 64
    """Live sessions at once (parked and closed ones do not count)."""
    creates_per_s: float = 10.0
    """Sessions created (and forked) per second, in bursts of up to twice that."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    etcd: str
    """etcd client address, host:port."""
    nats: str
    """NATS URL."""
    router: str
    """Router address, host:port."""
    session_service: str
    """Session service address, host:port."""
    listen: str = "127.0.0.1:0"
    max_message_bytes: int = grpc_util.PUBLIC_MAX_MESSAGE_BYTES
    """Largest client message accepted; bigger ones fail with RESOURCE_EXHAUSTED."""
    recover_timeout_s: float = 20.0
    """How long a stream may wait for its session to be recovered on another worker."""
    rpc_timeout_s: float = 15.0
    """Deadline for the gateway's unary calls to other services."""
    insecure: bool = False
    """Serve without authentication: no token, no tenants, no budgets (local use only)."""
    quotas: Quotas = field(default_factory=Quotas)
    """Per-tenant limits on live sessions and on session creations per second."""
    otlp_endpoint: str | None = None
    metrics_listen: str = ""
    """Where ``GET /metrics`` (Prometheus) is served, host:port; empty: nowhere."""
