"""Names in etcd and NATS, and span names: constants in one place."""

from __future__ import annotations

# ---- etcd keys ----
ETCD_PREFIX = "/windflow/v1"
WORKERS_PREFIX = f"{ETCD_PREFIX}/workers/"
SESSIONS_PREFIX = f"{ETCD_PREFIX}/sessions/"


def worker_key(worker_id: str) -> str:
    return f"{WORKERS_PREFIX}{worker_id}"


def placement_key(session_id: str) -> str:
    return f"{SESSIONS_PREFIX}{session_id}/placement"


def delivered_key(session_id: str) -> str:
    """The frame after the last one a client of the session received (``DeliveredHeads``)."""
    return f"{SESSIONS_PREFIX}{session_id}/delivered"


def session_record_key(session_id: str) -> str:
    return f"{SESSIONS_PREFIX}{session_id}/record"


TENANTS_PREFIX = f"{ETCD_PREFIX}/tenants/"


def tenant_sessions_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/sessions/"


def tenant_session_key(tenant: str, session_id: str) -> str:
    """A tenant's session, while it is not closed (empty value): the gateway counts those
    whose placement is not parked against the tenant's concurrent-session quota."""
    return f"{tenant_sessions_prefix(tenant)}{session_id}"


ACCESS_PREFIX = f"{ETCD_PREFIX}/access/"
"""API keys and token signing keys (``windflow.access``). The ``root`` argument of the
functions below exists so tests sharing one etcd can keep to a prefix of their own."""


def api_keys_prefix(root: str = ACCESS_PREFIX) -> str:
    return f"{root}keys/"


def api_key_key(key_id: str, root: str = ACCESS_PREFIX) -> str:
    """A tenant's API key record (its SHA-256, never the secret)."""
    return f"{api_keys_prefix(root)}{key_id}"


def signing_keys_prefix(root: str = ACCESS_PREFIX) -> str:
    return f"{root}signing/"


def signing_key_key(kid: str, root: str = ACCESS_PREFIX) -> str:
    """A token signing key (Ed25519; the private half until it is retired)."""
    return f"{signing_keys_prefix(root)}{kid}"


# ---- gRPC metadata the gateway gives a worker leg (the stream's verified token) ----
METADATA_TENANT = "windflow-tenant"
METADATA_TOKEN_ID = "windflow-token-id"
METADATA_BUDGET_FRAMES = "windflow-budget-frames"
"""Frames the leg may still make for the stream's token (absent: no cap)."""

# ---- NATS subjects: windflow.v1.<area>.<event> ----
SUBJECT_PREFIX = "windflow.v1"
SUBJECT_SESSION_CREATED = f"{SUBJECT_PREFIX}.session.created"
SUBJECT_SESSION_PLACED = f"{SUBJECT_PREFIX}.session.placed"
SUBJECT_SESSION_CLOSED = f"{SUBJECT_PREFIX}.session.closed"
SUBJECT_SESSION_RECOVERED = f"{SUBJECT_PREFIX}.session.recovered"
SUBJECT_SESSION_FORKED = f"{SUBJECT_PREFIX}.session.forked"
SUBJECT_SESSION_REWOUND = f"{SUBJECT_PREFIX}.session.rewound"
SUBJECT_SESSION_PARKED = f"{SUBJECT_PREFIX}.session.parked"
SUBJECT_SESSION_RECLAIMED = f"{SUBJECT_PREFIX}.session.reclaimed"
"""A session closed by the reclaimer (never attached, or parked past its retention)."""
SUBJECT_MIGRATION = f"{SUBJECT_PREFIX}.migration"
"""Live migration hand-offs: ``<this>.<step>``, step one of MIGRATION_STEPS."""
MIGRATION_STEPS = ("prepare", "ready", "cutover", "done", "aborted")
SUBJECT_WORKER_UP = f"{SUBJECT_PREFIX}.worker.up"
SUBJECT_WORKER_DOWN = f"{SUBJECT_PREFIX}.worker.down"

# ---- span names ----
SPAN_CREATE_SESSION = "windflow.gateway.create_session"
SPAN_GATEWAY_STREAM = "windflow.gateway.stream"
SPAN_GATEWAY_FRAME = "windflow.gateway.frame"
SPAN_ROUTER_PLACE = "windflow.router.place"
SPAN_ROUTER_MIGRATE = "windflow.router.migrate"
SPAN_WORKER_SESSION = "windflow.worker.session"
SPAN_WORKER_FRAME = "windflow.worker.frame"
SPAN_WORKER_STEP = "windflow.worker.step"
