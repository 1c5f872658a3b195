"""Router configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RouterConfig:
    etcd: str
    """etcd client address, host:port."""
    nats: str
    """NATS URL."""
    listen: str = "127.0.0.1:0"
    region: str = "local"
    """The router's own region (informational; placement uses the session's region)."""
    place_attempts: int = 3
    """Workers tried for one placement before giving up."""
    open_timeout_s: float = 30.0
    """Deadline for a worker's OpenSession (a restore replays up to a checkpoint interval)."""
    probe_timeout_s: float = 0.3
    """How long a suspect worker gets to answer a health check before it counts as dead."""
    recover_retry_s: float = 0.5
    """When a recovery finds no live worker for the model: how soon the gateway asks again."""
    recover_concurrency: int = 8
    """Sessions of a dead worker re-placed at once (each restore replays on its new
    worker); new placements never wait behind them."""
    election_ttl_s: int = 2
    """The leader's lease TTL: when the leading replica dies, another leads within it."""
    election_heartbeat_s: float = 0.5
    """How often the leader renews its lease (well under the TTL)."""
    advertise: str | None = None
    """The address other replicas forward to (default: the bound listen address)."""
    rebalance_every_s: float = 0.0
    """Seconds between rebalance rounds, which move live sessions off a worker whose load
    stands out (services/router/rebalance.py; the leader only); 0: no rebalancing."""
    rebalance_cooldown_s: float = 30.0
    """A session moved by rebalancing (or whose move failed) stays at least this long."""
    otlp_endpoint: str | None = None
    metrics_listen: str = ""
    """Where ``GET /metrics`` (Prometheus) is served, host:port; empty: nowhere."""
