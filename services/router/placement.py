"""Placement: the router's pure core. Which worker gets a session?

Rules, in order: the worker serves the model; it has a free slot; it can meet the
session's fps (its published headroom for the model at the session's floor step count is
at least the session's fps: docs/runtime.md); it is in the session's region when any such
worker is (otherwise any region); then the lowest load (predicted utilization when
published, else sessions / capacity); ties by id.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from windflow.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    address: str
    region: str
    models: frozenset[str]
    capacity: int
    sessions: int
    headroom: Mapping[tuple[str, int], float] = field(default_factory=dict)
    """(model id, steps) -> fps more it can admit; empty = admission by slots only."""
    utilization: float | None = None
    """Predicted busy fraction of its step thread, when it publishes one."""
    draining: bool = False
    """Takes no new session (a drain by live migration in progress)."""

    @property
    def free(self) -> int:
        return self.capacity - self.sessions

    @property
    def load(self) -> float:
        if self.utilization is not None:
            return self.utilization
        return self.sessions / self.capacity if self.capacity else 1.0

    def room(self, demand: Demand) -> float:
        """fps of ``demand``'s model at its floor steps it can still admit (inf: unknown)."""
        steps = demand.floor_steps(self.headroom)
        room = self.headroom.get((demand.model_id, steps))
        return math.inf if room is None else room

    def fits(self, demand: Demand | None) -> bool:
        if demand is None or not self.headroom:
            return True
        return self.room(demand) + 1e-6 >= demand.fps

    def admit(self, demand: Demand | None) -> WorkerView:
        """This view with one more session of ``demand`` counted in (until the worker's own
        update arrives): headroom shrinks in proportion (it scales as 1 / frame cost)."""
        headroom = dict(self.headroom)
        utilization = self.utilization
        if demand is not None and headroom:
            room = headroom.get((demand.model_id, demand.floor_steps(headroom)))
            if room:
                share = min(1.0, demand.fps / room)
                headroom = {k: v * (1.0 - share) for k, v in headroom.items()}
                if utilization is not None:
                    # the free fraction (1 - u) shrinks by the same share
                    utilization += (1.0 - utilization) * share
        return WorkerView(
            self.worker_id,
            self.address,
            self.region,
            self.models,
            self.capacity,
            self.sessions + 1,
            headroom,
            utilization,
            self.draining,
        )


@dataclass(frozen=True, slots=True)
class Demand:
    """What admission needs to know about a new session."""

    model_id: str
    fps: float
    steps: int
    """The step count it asked for."""
    min_steps: int = 0
    """Its floor of the step ladder (0 = the model's lowest rung)."""
    adaptive: bool = True

    def floor_steps(self, headroom: Mapping[tuple[str, int], float]) -> int:
        if not self.adaptive:
            return self.steps
        if self.min_steps:
            return min(self.min_steps, self.steps)
        rungs = [k for (m, k) in headroom if m == self.model_id]
        return min(rungs, default=self.steps)


def choose_worker(
    workers: Iterable[WorkerView],
    model_id: str,
    region: str = "",
    exclude: Collection[str] = (),
    prefer: str = "",
    demand: Demand | None = None,
    retry_after_s: float = 2.0,
) -> WorkerView:
    """The best worker for a new session; NotFound / ResourceExhausted say why none fits.

    ``prefer`` (affinity, e.g. a fork's parent's worker) wins whenever it fits at all.
    """
    candidates = [w for w in workers if w.worker_id not in exclude and not w.draining]
    serving = [w for w in candidates if model_id in w.models]
    if not serving:
        raise NotFound(f"no live worker serves model {model_id!r}")
    free = [w for w in serving if w.free > 0]
    if not free:
        raise ResourceExhausted(
            f"every worker serving {model_id!r} is full ({len(serving)} workers)",
            retry_after_s=retry_after_s,
        )
    able = [w for w in free if w.fits(demand)]
    if not able:
        assert demand is not None
        best = max(free, key=lambda w: w.room(demand))
        raise ResourceExhausted(
            f"no worker serving {model_id!r} can meet {demand.fps:g} fps now "
            f"({len(free)} with free slots, all without enough headroom; the most is "
            f"{best.room(demand):.1f} fps on {best.worker_id})",
            retry_after_s=retry_after_s,
        )
    free = able
    for worker in free:
        if worker.worker_id == prefer:
            return worker
    if region:
        local = [w for w in free if w.region == region]
        free = local or free
    # Loads within the same tenth count as equal (two idle workers' calibrations differ by
    # noise): then the one with fewer sessions wins, so equal workers share evenly.
    return min(free, key=lambda w: (int(w.load * 10), w.sessions, w.load, w.worker_id))


def choose_target(
    workers: Iterable[WorkerView],
    model_id: str,
    source: str,
    *,
    to_worker: str = "",
    region: str = "",
    prefer_region: str = "",
    demand: Demand | None = None,
) -> WorkerView:
    """Where a live migration of a session of ``model_id`` on ``source`` goes.

    ``to_worker``: that worker, or why not: InvalidArgument (unknown), FailedPrecondition
    (the source itself, draining, without the model), ResourceExhausted (full).
    ``region``: the best worker there (InvalidArgument: no worker in that region).
    Otherwise the best other worker, in ``prefer_region`` (the session's) when one fits.
    FailedPrecondition when no other worker serves the model (a drain of its last worker
    leaves the session where it is)."""
    pool = list(workers)
    if to_worker:
        target = next((w for w in pool if w.worker_id == to_worker), None)
        if target is None:
            raise InvalidArgument(f"no live worker {to_worker!r}")
        if target.worker_id == source:
            raise FailedPrecondition(f"session is on {source} already")
        if target.draining:
            raise FailedPrecondition(f"worker {to_worker} is draining")
        if model_id not in target.models:
            raise FailedPrecondition(f"worker {to_worker} does not serve model {model_id!r}")
        if target.free <= 0 or not target.fits(demand):
            raise ResourceExhausted(f"worker {to_worker} has no room for the session")
        return target
    if region and not any(w.region == region for w in pool):
        known = ", ".join(sorted({w.region for w in pool})) or "none"
        raise InvalidArgument(f"no worker in region {region!r} (regions: {known})")
    if region:
        pool = [w for w in pool if w.region == region]
    try:
        return choose_worker(pool, model_id, prefer_region, exclude=(source,), demand=demand)
    except NotFound as err:
        where = f" in region {region}" if region else ""
        raise FailedPrecondition(
            f"no other live worker{where} serves model {model_id!r}: the session stays on {source}"
        ) from err
