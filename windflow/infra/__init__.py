"""Process infrastructure: free ports, managed child processes, etcd and NATS launchers,
a generic supervisor and the embedded ``Stack`` behind ``windflow up``.

Nothing here knows what a service does; it starts programs, decides when they are ready
(gRPC health, etcd ``/health``, a NATS JetStream round trip) and keeps them alive.
"""

from windflow.infra.errors import (
    BinaryNotFound,
    ChildExited,
    ChildNotReady,
    InfraError,
    StackFailed,
)
from windflow.infra.etcd import EtcdServer
from windflow.infra.health import GrpcHealthProbe, ReadyProbe
from windflow.infra.nats import NatsServer
from windflow.infra.ports import free_port, free_ports
from windflow.infra.procs import (
    ChildSpec,
    ManagedProcess,
    RestartPolicy,
    child_pids,
    cpu_seconds,
    pid_alive,
)
from windflow.infra.stack import Stack, StackConfig
from windflow.infra.supervisor import ChildExit, Supervisor

__all__ = [
    "BinaryNotFound",
    "ChildExit",
    "ChildExited",
    "ChildNotReady",
    "ChildSpec",
    "EtcdServer",
    "GrpcHealthProbe",
    "InfraError",
    "ManagedProcess",
    "NatsServer",
    "ReadyProbe",
    "RestartPolicy",
    "Stack",
    "StackConfig",
    "StackFailed",
    "Supervisor",
    "child_pids",
    "cpu_seconds",
    "free_port",
    "free_ports",
    "pid_alive",
]
