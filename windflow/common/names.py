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


# ---- NATS subjects: windflow.v1.<area>.<event> ----
SUBJECT_PREFIX = "windflow.v1"
SUBJECT_SESSION_CREATED = f"{SUBJECT_PREFIX}.session.created"
SUBJECT_SESSION_PLACED = f"{SUBJECT_PREFIX}.session.placed"
SUBJECT_SESSION_CLOSED = f"{SUBJECT_PREFIX}.session.closed"
SUBJECT_SESSION_RECOVERED = f"{SUBJECT_PREFIX}.session.recovered"
SUBJECT_SESSION_FORKED = f"{SUBJECT_PREFIX}.session.forked"
SUBJECT_SESSION_REWOUND = f"{SUBJECT_PREFIX}.session.rewound"
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
