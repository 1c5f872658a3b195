"""Worker configuration: one validated dataclass, every field documented."""

from __future__ import annotations

from dataclasses import dataclass

from windflow.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    etcd: str
    """etcd client address, host:port."""
    nats: str
    """NATS URL, nats://host:port."""
    worker_id: str
    """Unique id of this worker in the mesh (its etcd key)."""
    listen: str = "127.0.0.1:0"
    """gRPC listen address; port 0 picks a free port."""
    advertise: str | None = None
    """Address the gateway and router dial; defaults to the bound listen address."""
    region: str = "local"
    models: tuple[str, ...] = ("windflow-world",)
    """Model ids to load at start (see services.worker.models.registry)."""
    capacity: int = 8
    """Sessions this worker accepts at once."""
    lease_ttl_s: int = 3
    """etcd lease TTL: a dead worker's key disappears at most this long after it dies."""
    heartbeat_s: float = 1.0
    """Lease keep-alive period; must be well under the TTL."""
    window: int = 8
    """Default client flow-control window (frames in flight unacknowledged)."""
    out_queue: int = 4
    """Frames a session may buffer beyond its window before its output policy applies."""
    max_pending_controls: int = 256
    """Future-stamped controls a session may hold; more are refused, never dropped."""
    recheck_idle_s: float = 5.0
    """While it has no session, the worker re-times each model's reference batch this
    often and rescales its step costs when they moved (0: never). A calibration taken
    while the machine was busy (a whole stack starting on a small machine) would otherwise
    keep an idle worker refusing sessions by fps until one landed there."""
    placement_check_s: float = 2.0
    """How often the worker checks that each session it holds is still placed on it at its
    epoch, and drops those moved away or closed while it could not hear of it (a stall
    past its lease, a close while it was unreachable): their slots and state go (0: never)."""
    batch_horizon_ms: float = 8.0
    """Sessions due within this much of the earliest deadline join its batch."""
    checkpoint_every: int = 48
    """Frames between durable checkpoints of a session (0: never)."""
    memory_snapshot_every: int = 2
    """Frames between in-memory snapshots (fast forks and rewinds on this worker; 0: never):
    copies of the state kept where the model runs (``WorldModel.copy``), so a fork or
    rewind replays at most this many frames less one."""
    memory_snapshots: int = 32
    """In-memory snapshots kept per session (the newest): with the default spacing they
    reach 64 frames back."""
    memory_snapshot_mb: float = 16.0
    """Memory per session for its in-memory snapshots, by the model's declared
    ``state_bytes``: where fewer copies fit, fewer are kept, spaced wider to reach as far
    back; where none fits (a large model's KV cache), none (forks and rewinds restore
    from durable checkpoints). 0: no budget."""
    step_threads: int = 1
    """torch intra-op threads used by the model step."""
    model_process: bool = True
    """Run each model in a process of its own (``services.worker.model_host``), so that the
    model step never waits for the interpreter lock the event loop holds; False: in the
    worker's process, in its step thread (docs/runtime.md, "Model hosts")."""
    pipeline_depth: int = 2
    """Batches a model host may hold at once: 2 lets the loop send the next batch while
    one runs, when batches run back to back (its controls are then taken a batch
    earlier); 1: one at a time. A model in the worker's process always takes one."""
    otlp_endpoint: str | None = None
    metrics_listen: str = ""
    """Where ``GET /metrics`` (Prometheus) is served, host:port; empty: nowhere."""
    fps_admission: bool = True
    """Admit a session only if the predicted step-thread utilization, every session at its
    quality floor, stays under ``target_utilization`` (False: session slots only)."""
    target_utilization: float = 0.9
    """Admission's ceiling on the predicted busy fraction of the step thread."""
    admission_retry_after_s: float = 2.0
    """The retry-after hint sent with RESOURCE_EXHAUSTED when a session does not fit."""
    gil_switch_interval_ms: float = 0.5
    """The interpreter's thread switch interval (default Python: 5 ms). The step thread
    re-takes the GIL between torch ops; while the event loop holds it, the step thread
    waits up to this long, so the default 5 ms stalls batches (docs/runtime.md)."""
    router: str = ""
    """The router's address: on SIGTERM the worker asks it to drain it by live migration
    (``drain_deadline_s``); empty: its sessions go as after a crash."""
    drain_deadline_s: float = 30.0
    """How long a stopping worker's live migrations may take; what is left then moves as
    after a crash (the gateway re-places it)."""
    memory_budget_mb: float = 0.0
    """Per-model memory budget for one batch (caps the batch with the model's declared
    ``sample_bytes``); 0 = no budget beyond the model's max batch."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise InvalidArgument("worker_id must not be empty")
        if self.capacity < 1:
            raise InvalidArgument("capacity must be >= 1")
        if self.lease_ttl_s < 1 or self.heartbeat_s <= 0 or self.heartbeat_s >= self.lease_ttl_s:
            raise InvalidArgument("need lease_ttl_s >= 1 and 0 < heartbeat_s < lease_ttl_s")
        if not 1 <= self.window <= 64:
            raise InvalidArgument("window must be in 1..64")
        if self.gil_switch_interval_ms <= 0:
            raise InvalidArgument("gil_switch_interval_ms must be > 0")
        if not 0.0 < self.target_utilization <= 1.0:
            raise InvalidArgument("target_utilization must be in (0, 1]")
        if self.memory_budget_mb < 0 or self.admission_retry_after_s < 0:
            raise InvalidArgument("memory_budget_mb and admission_retry_after_s must be >= 0")
        if not 1 <= self.pipeline_depth <= 4:
            raise InvalidArgument("pipeline_depth must be in 1..4")
        if self.recheck_idle_s < 0:
            raise InvalidArgument("recheck_idle_s must be >= 0")
        if self.drain_deadline_s < 0:
            raise InvalidArgument("drain_deadline_s must be >= 0")
        if self.placement_check_s < 0:
            raise InvalidArgument("placement_check_s must be >= 0")
        if self.memory_snapshot_mb < 0:
            raise InvalidArgument("memory_snapshot_mb must be >= 0")
        if self.memory_snapshot_every < 0 or self.memory_snapshots < 1:
            raise InvalidArgument("need memory_snapshot_every >= 0 and memory_snapshots >= 1")
        if self.out_queue < 1 or self.max_pending_controls < 1:
            raise InvalidArgument("out_queue and max_pending_controls must be >= 1")
