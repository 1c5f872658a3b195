"""Every environment variable Windflow reads, declared here and read only here.

Command-line flags win over these; these win over built-in defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    doc: str

    def get(self, default: str | None = None) -> str | None:
        value = os.environ.get(self.name)
        return value if value not in (None, "") else default


OTLP_ENDPOINT = EnvVar(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTLP/gRPC collector address for traces and metrics; unset = spans are recorded nowhere "
    "and metrics are only served on --metrics-listen",
)
OTEL_SERVICE_NAME = EnvVar(
    "OTEL_SERVICE_NAME", "service name attached to exported spans and metrics"
)
JETSTREAM_REPLICAS = EnvVar(
    "WINDFLOW_JETSTREAM_REPLICAS",
    "replicas of the JetStream streams and buckets Windflow creates (1..5, default 1; 3 on a "
    "3-member NATS cluster, as deploy/k8s sets)",
)
ETCD_ENDPOINT = EnvVar("WINDFLOW_ETCD", "etcd client address host:port for `windflow serve`")
NATS_URL = EnvVar("WINDFLOW_NATS", "NATS URL nats://host:port for `windflow serve`")
REGION = EnvVar("WINDFLOW_REGION", "region of this service (workers and router)")
STEP_THREADS = EnvVar(
    "WINDFLOW_STEP_THREADS", "torch intra-op threads in a worker's model step thread (default 1)"
)
FAULTS = EnvVar(
    "WINDFLOW_FAULTS",
    "injected client-side faults for tests and `windflow bench chaos` (windflow/common/faults.py);"
    " unset = none",
)
FAULTS_SEED = EnvVar("WINDFLOW_FAULTS_SEED", "seed of probabilistic fault rules (default 0)")
TOKEN = EnvVar(
    "WINDFLOW_TOKEN",
    "the session token the SDK and `windflow play` send (`windflow up` writes one to "
    "<state dir>/token)",
)

ALL: tuple[EnvVar, ...] = (
    OTLP_ENDPOINT,
    OTEL_SERVICE_NAME,
    ETCD_ENDPOINT,
    NATS_URL,
    REGION,
    STEP_THREADS,
    FAULTS,
    FAULTS_SEED,
    TOKEN,
)
