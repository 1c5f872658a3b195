"""Placement: the router's pure core. Which worker gets a session?

Rules, in order: the worker serves the model; it has a free slot; it is in the session's
region when any such worker is (otherwise any region); then the lowest load; ties by id.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from windflow.errors import NotFound, ResourceExhausted


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    address: str
    region: str
    models: frozenset[str]
    capacity: int
    sessions: int

    @property
    def free(self) -> int:
        return self.capacity - self.sessions

    @property
    def load(self) -> float:
        return self.sessions / self.capacity if self.capacity else 1.0


def choose_worker(
    workers: Iterable[WorkerView],
    model_id: str,
    region: str = "",
    exclude: Collection[str] = (),
    prefer: str = "",
) -> WorkerView:
    """The best worker for a new session; NotFound / ResourceExhausted say why none fits.

    ``prefer`` (affinity, e.g. a fork's parent's worker) wins whenever it fits at all.
    """
    candidates = [w for w in workers if w.worker_id not in exclude]
    serving = [w for w in candidates if model_id in w.models]
    if not serving:
        raise NotFound(f"no live worker serves model {model_id!r}")
    free = [w for w in serving if w.free > 0]
    if not free:
        raise ResourceExhausted(
            f"every worker serving {model_id!r} is full ({len(serving)} workers)",
            retry_after_s=2.0,
        )
    for worker in free:
        if worker.worker_id == prefer:
            return worker
    if region:
        local = [w for w in free if w.region == region]
        free = local or free
    return min(free, key=lambda w: (w.load, w.sessions, w.worker_id))
