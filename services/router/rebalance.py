"""Rebalancing: the router moves live sessions off a worker whose load stands out.

Placement balances only what arrives: a worker that joins a busy mesh stays idle until new
sessions come, and one that took a burst keeps it. A rebalance round compares each worker's
load with the mesh's mean and moves sessions by live migration (``Migrator.migrate``, the
client sees one KIND_MIGRATED per move and no lost frame) from a worker above it to one
below it.

The decision is a pure core (``overloaded``, ``plan_moves``) on plain data; ``Rebalancer``
runs it every few seconds on the router's worker table and the placements in etcd.

What keeps it from doing harm:

- Hysteresis: a worker enters a rebalancing episode when its load exceeds the mean by
  more than ``start_gap`` and leaves it once within ``stop_gap``; a worker never in one is
  left alone, so noise around the mean moves nothing.
- No ping-pong: a move must leave its target less loaded than its source was, so a move
  back can never pay off (its reverse would have to as well).
- A session moved (or whose move failed) waits ``cooldown_s`` before it moves again; each
  worker takes part in at most ``max_per_worker`` moves at once; a round plans at most
  ``max_moves``.
- Draining workers take no part: their drain moves their sessions, and nothing goes to them.
- A session in its own region stays in it (``keep_region``); one elsewhere goes home first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.router.placement import Demand, WorkerView
from services.router.service import demand_of
from windflow.errors import InvalidArgument, NotFound, WindflowError
from windflow.v1 import internal_pb2

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)

EPSILON = 1e-9
"""Loads closer than this are equal (float noise must not make a move look worth it)."""

_Choice = tuple[tuple[bool, bool, float, str, str], "Move", WorkerView, WorkerView]
"""A candidate move: its rank (lowest best), the move, its source and target after it."""


@dataclass(frozen=True, slots=True)
class RebalanceParams:
    start_gap: float = 0.25
    """A worker enters an episode when its load exceeds the mean by more than this."""
    stop_gap: float = 0.1
    """... and leaves it once within this of the mean."""
    max_per_worker: int = 1
    """Moves at once per worker, as source or target (each one copies a session's state)."""
    cooldown_s: float = 30.0
    """A session moved (or tried) waits this long before it moves again."""
    max_moves: int = 4
    """Moves planned per round."""
    settle_s: float = 2.0
    """A worker whose move ended less than this ago is left out of the next rounds: the
    router's view of its load may not count that move yet (its own update follows it)."""
    keep_region: bool = True
    """A session in its own region moves only within it (balance is not worth its latency)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.stop_gap <= self.start_gap:
            raise InvalidArgument("rebalance gaps need 0 <= stop_gap <= start_gap")
        if self.max_per_worker < 1 or self.max_moves < 1:
            raise InvalidArgument("rebalance max_per_worker and max_moves must be >= 1")
        if self.cooldown_s < 0 or self.settle_s < 0:
            raise InvalidArgument("rebalance cooldown_s and settle_s must be >= 0")


@dataclass(frozen=True, slots=True)
class SessionView:
    """A placed session, as its placement record says."""

    session_id: str
    model_id: str
    region: str = ""
    """The region it asked for (empty: any)."""
    demand: Demand | None = None
    """What its target must admit (None: a free slot is enough)."""


@dataclass(frozen=True, slots=True)
class Move:
    session_id: str
    from_worker_id: str
    to_worker_id: str


def _mean_load(workers: Iterable[WorkerView]) -> float:
    loads = [w.load for w in workers]
    return sum(loads) / len(loads) if loads else 0.0


def overloaded(
    workers: Iterable[WorkerView], active: Collection[str], params: RebalanceParams
) -> frozenset[str]:
    """The workers in a rebalancing episode now, given those that were (``active``): above
    the mean of the non-draining workers by more than ``start_gap``, or by more than
    ``stop_gap`` if already in one. Idempotent: ``overloaded(w, overloaded(w, a))`` is
    ``overloaded(w, a)``."""
    live = [w for w in workers if not w.draining]
    mean = _mean_load(live)
    return frozenset(
        w.worker_id
        for w in live
        if w.load - mean > params.start_gap + EPSILON
        or (w.worker_id in active and w.load - mean > params.stop_gap + EPSILON)
    )


def _unit(worker: WorkerView) -> float:
    """The load one of ``worker``'s sessions accounts for (its mean share)."""
    if worker.utilization is None:
        return 1.0 / worker.capacity if worker.capacity else 1.0
    return worker.utilization / max(1, worker.sessions)


def _without(worker: WorkerView, unit: float) -> WorkerView:
    utilization = worker.utilization
    if utilization is not None:
        utilization = max(0.0, utilization - unit)
    return dataclasses.replace(
        worker, sessions=max(0, worker.sessions - 1), utilization=utilization
    )


def _with(worker: WorkerView, demand: Demand | None, unit: float) -> WorkerView:
    """``worker`` with one more session: as placement counts it in where the worker
    publishes headroom, else by slots, else with the session's share on its source."""
    after = worker.admit(demand)
    if worker.utilization is None or after.utilization is None:
        return after  # by slots
    if after.utilization > worker.utilization + EPSILON:
        return after
    # no headroom to count it by (none published, or none known for its fps)
    return dataclasses.replace(after, utilization=after.utilization + unit)


def plan_moves(
    workers: Sequence[WorkerView],
    sessions: Mapping[str, Sequence[SessionView]],
    *,
    moving: Mapping[str, int],
    last_moved: Mapping[str, float],
    now: float,
    params: RebalanceParams,
    active: Collection[str],
    settling: Collection[str] = (),
) -> list[Move]:
    """The moves of one round, in order: pure and deterministic (ties by id).

    ``sessions``: worker id -> the sessions placed on it (those already migrating left
    out). ``moving``: worker id -> its moves in flight. ``last_moved``: session id -> when
    it last moved or tried to. ``active``: the workers in an episode before this round
    (``overloaded`` gives the next state). ``settling``: workers left out (a move just
    ended there).

    Sources: the workers in an episode, most loaded first, while still above the mean by
    more than ``stop_gap`` after the moves planned before. Each gets the best move of one
    of its sessions (not cooling down) to a worker that serves its model, has a free slot
    and fits its fps, and is left less loaded than the source was; best: in the session's
    region, then a session out of its region (or with none) before one at home, then the
    least loaded target after the move, then by id."""
    views = {w.worker_id: w for w in sorted(workers, key=lambda w: w.worker_id) if not w.draining}
    episode = overloaded(views.values(), active, params)
    busy = Counter({w: n for w, n in moving.items() if n > 0})
    taken: set[str] = set()
    moves: list[Move] = []

    def free(worker_id: str) -> bool:
        return worker_id not in settling and busy[worker_id] < params.max_per_worker

    def best(source: WorkerView) -> _Choice | None:
        unit = _unit(source)
        found: _Choice | None = None
        for session in sorted(sessions.get(source.worker_id, ()), key=lambda s: s.session_id):
            if session.session_id in taken:
                continue
            if now - last_moved.get(session.session_id, -math.inf) < params.cooldown_s:
                continue
            home = bool(session.region) and source.region == session.region
            for target in views.values():
                if target.worker_id == source.worker_id or not free(target.worker_id):
                    continue
                if session.model_id not in target.models:
                    continue
                if target.free <= 0 or not target.fits(session.demand):
                    continue
                away = bool(session.region) and target.region != session.region
                if away and home and params.keep_region:
                    continue
                after = _with(target, session.demand, unit)
                if after.load >= source.load - EPSILON:
                    continue  # the target would end as loaded as the source was: no gain
                key = (away, home, after.load, target.worker_id, session.session_id)
                if found is None or key < found[0]:
                    move = Move(session.session_id, source.worker_id, target.worker_id)
                    found = (key, move, _without(source, unit), after)
        return found

    while len(moves) < params.max_moves:
        mean = _mean_load(views.values())
        sources = sorted(
            (
                w
                for w in views.values()
                if w.worker_id in episode
                and free(w.worker_id)
                and w.load - mean > params.stop_gap + EPSILON
            ),
            key=lambda w: (-w.load, w.worker_id),
        )
        for source in sources:
            found = best(source)
            if found is not None:
                break
        else:
            break
        _, move, source_after, target_after = found
        moves.append(move)
        taken.add(move.session_id)
        views[move.from_worker_id] = source_after
        views[move.to_worker_id] = target_after
        busy[move.from_worker_id] += 1
        busy[move.to_worker_id] += 1
    return moves


class Rebalancer:
    """Runs a rebalance round every ``every_s`` seconds while ``is_leader()`` (one router
    of several moves sessions), its moves concurrently within ``params``' caps. A round
    never waits for the moves of the one before: those still in flight count against the
    caps. Nothing it meets ends the loop (a failed round or move is logged).

    Lifecycle: construct -> ``start()`` -> ``aclose()`` (cancels the moves in flight: each
    aborts, its session streaming on at its source)."""

    def __init__(
        self,
        service: RouterService,
        *,
        every_s: float,
        params: RebalanceParams | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_s <= 0:
            raise InvalidArgument("rebalance every_s must be > 0")
        self._service = service
        self.every_s = every_s
        self.params = params or RebalanceParams()
        self._is_leader = is_leader
        self._clock = clock
        self.active: frozenset[str] = frozenset()
        """Workers in a rebalancing episode (the hysteresis state)."""
        self._last_moved: dict[str, float] = {}
        self._ended: dict[str, float] = {}
        """Worker id -> when its last move ended (it settles after)."""
        self._moving: Counter[str] = Counter()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        """Session id -> its move."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-rebalance")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rebalance round failed; the next one in %.1f s", self.every_s)

    async def round(self) -> list[Move]:
        """One round: plan on the table and placements as they are now, start its moves
        (without waiting for them). Returns the moves started."""
        if not self._is_leader():
            self.active = frozenset()  # another router's episodes; ours start afresh
            return []
        service, params = self._service, self.params
        records = await service.placements()
        now = self._clock()
        self._last_moved = {
            s: t for s, t in self._last_moved.items() if now - t < params.cooldown_s
        }
        self._ended = {w: t for w, t in self._ended.items() if now - t < params.settle_s}
        placed = Counter(r.worker_id for r in records.values())
        sessions: dict[str, list[SessionView]] = {}
        for session_id, record in records.items():
            if session_id in self._in_flight:
                continue
            spec = record.spec
            view = SessionView(session_id, spec.model_id, spec.region, demand_of(spec))
            sessions.setdefault(record.worker_id, []).append(view)
        # The placements count a worker's sessions exactly; the table may lag them, or be
        # one short (a migration's own decrement after the source's update already).
        workers = [
            dataclasses.replace(w, sessions=max(w.sessions, placed[w.worker_id]))
            for w in service.workers.values()
        ]
        self.active = overloaded(workers, self.active, params)
        moves = plan_moves(
            workers,
            sessions,
            moving=self._moving,
            last_moved=self._last_moved,
            now=now,
            params=params,
            active=self.active,
            settling=set(self._ended),
        )
        if moves:
            loads = ", ".join(f"{w.worker_id} {w.load:.2f}" for w in workers)
            log.info("rebalance: %d move(s) (loads: %s)", len(moves), loads)
        for move in moves:
            self._last_moved[move.session_id] = now
            self._moving[move.from_worker_id] += 1
            self._moving[move.to_worker_id] += 1
            self._in_flight[move.session_id] = asyncio.create_task(
                self._move(move), name=f"rebalance:{move.session_id}"
            )
        return moves

    async def _move(self, move: Move) -> None:
        try:
            result = await self._service.migrator.migrate(
                internal_pb2.MigrateRequest(
                    session_id=move.session_id, to_worker_id=move.to_worker_id, reason="rebalance"
                )
            )
            log.info(
                "rebalance: session %s moved %s -> %s at frame %d",
                move.session_id,
                move.from_worker_id,
                move.to_worker_id,
                result.cutover_frame,
            )
        except NotFound:
            log.info("rebalance: session %s closed before its move", move.session_id)
        except WindflowError as err:
            log.warning(
                "rebalance: session %s stays on %s: %s",
                move.session_id,
                move.from_worker_id,
                err.message,
            )
        except Exception:
            log.exception("rebalance: moving session %s failed", move.session_id)
        finally:
            ended = self._clock()
            self._last_moved[move.session_id] = ended  # the cooldown counts from the end
            for worker_id in (move.from_worker_id, move.to_worker_id):
                self._ended[worker_id] = ended
                self._moving[worker_id] -= 1
                if self._moving[worker_id] <= 0:
                    del self._moving[worker_id]
            self._in_flight.pop(move.session_id, None)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        moves = list(self._in_flight.values())
        for move in moves:
            move.cancel()
        await asyncio.gather(*([task] if task else []), *moves, return_exceptions=True)
