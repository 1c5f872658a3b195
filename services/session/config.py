"""Session service configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ReclaimPolicy:
    """When abandoned sessions are reclaimed (services/session/reclaim.py); 0 turns a rule
    off."""

    every_s: float = 1.0
    """How often the workers' idle sessions are looked for."""
    unattached_s: float = 30.0
    """A session no client attached to within this is closed."""
    park_after_s: float = 60.0
    """A session without a client this long is parked (checkpointed, slot freed)."""

    @property
    def enabled(self) -> bool:
        return self.every_s > 0 and (self.unattached_s > 0 or self.park_after_s > 0)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What sessions keep of their past (services/session/retention.py)."""

    every_s: float = 60.0
    """How often sessions are thinned and closed ones deleted (0: never)."""
    recent_s: float = 300.0
    """Every checkpoint this far (in the session's own seconds of frames) before its head
    stays."""
    tiers: tuple[tuple[float, float], ...] = ((3600.0, 60.0), (math.inf, 600.0))
    """Further back: (up to this far back, one checkpoint per this many seconds)."""
    parked_retention_s: float = 24 * 3600.0
    """A session parked this long is closed (0: never)."""
    closed_retention_s: float = 24 * 3600.0
    """A closed session's state goes this long after it closed (0: never)."""


@dataclass(frozen=True, slots=True)
class SessionServiceConfig:
    etcd: str
    """etcd client address, host:port."""
    nats: str
    """NATS URL."""
    router: str = ""
    """Router address, host:port (forks are placed through it)."""
    listen: str = "127.0.0.1:0"
    reclaim: ReclaimPolicy = field(default_factory=ReclaimPolicy)
    """When abandoned sessions are closed or parked (services/session/reclaim.py)."""
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    otlp_endpoint: str | None = None
    metrics_listen: str = ""
    """Where ``GET /metrics`` (Prometheus) is served, host:port; empty: nowhere."""
