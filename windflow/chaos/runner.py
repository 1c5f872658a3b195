"""One chaos schedule played against a fresh stack, and its histories checked.

``play_schedule(plan, state_dir)``:

1. starts a ``Cluster`` (two workers with a 2 s lease; the schedule's injected log-append
   errors in their environment) and creates the schedule's sessions (raw RGB, PAUSE; fixed
   quality, or adaptive for a script's ``adaptive`` ones, whose step changes are logged:
   replays compare bit for bit either way);
2. plays every session's script (``player``) while the ``Injector`` fires the faults;
3. brings back whatever is down, waits past a lease, then reads each (detached) session's
   head, attaches once more to show it still plays, reads its head, checkpoints, Replay of
   every frame delivered, its control log and checkpoint objects, and the workers' actor
   counts before and after closing the sessions;
4. checks it all (``history``) and returns a ``ScheduleResult``. The stack's logs are kept
   when a rule is broken (``ScheduleResult.state_dir``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nats
import nats.js.errors
from nats.js import JetStreamContext

from services.worker.models.registry import DEFAULT_MODEL
from windflow.chaos.cluster import Cluster, ClusterConfig
from windflow.chaos.history import (
    Delivered,
    Limits,
    LogRecord,
    SessionHistory,
    Violation,
    check_actors,
    check_session,
    frames_checked,
)
from windflow.chaos.injector import Injected, Injector
from windflow.chaos.player import Progress, SessionPlayer, digest
from windflow.chaos.schedule import LEASE_TTL_S, Schedule
from windflow.common import env, etcd
from windflow.common.durable import CHECKPOINT_BUCKET, ControlLog
from windflow.errors import WindflowError
from windflow.sdk import Client
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_EVERY = 48
WORKER_ARGS: tuple[str, ...] = (
    "--lease-ttl", str(LEASE_TTL_S),
    "--heartbeat", "0.5",
    "--checkpoint-every", str(CHECKPOINT_EVERY),
    # every session of a schedule fits on one worker (the other may be down), and
    # admission by slots: the schedule, not the machine's speed, decides what runs where
    "--capacity", "32",
    "--admission", "slots",
)  # fmt: skip
SPEC: dict[str, object] = {"format": "rgb", "output_policy": "pause", "quality": "fixed"}
"""The spec of a schedule's sessions; a script's ``adaptive`` sessions replace the quality."""
SETTLE_S = LEASE_TTL_S + 1.5
"""After the last fault, long enough for a lease to lapse and its sessions to move."""
READ_RETRY_S = 10.0
"""How long the checks retry a read (GetSession, Replay) that fails."""
ACTORS_WAIT_S = 8.0
"""How long the workers' records may take to show the actors they hold."""


@dataclass(slots=True)
class ScheduleResult:
    schedule: Schedule
    histories: list[SessionHistory]
    violations: list[Violation]
    faults: list[Injected]
    injected_errors: int
    """NATS client errors injected into log appends (from the workers' logs)."""
    elapsed_s: float
    state_dir: Path | None = None
    """The stack's state and logs, kept when a rule is broken."""
    notes: list[str] = field(default_factory=list)

    @property
    def faults_injected(self) -> int:
        return len(self.faults) + self.injected_errors

    @property
    def frames_checked(self) -> int:
        return sum(frames_checked(h) for h in self.histories)

    @property
    def sessions_lost(self) -> int:
        return sum(1 for h in self.histories if h.lost)


async def play_schedule(
    plan: Schedule, state_dir: Path, *, model: str = DEFAULT_MODEL, n_actions: int = 5
) -> ScheduleResult:
    """Play ``plan`` on a fresh stack under ``state_dir`` (removed unless a rule broke)."""
    started = time.monotonic()
    worker_env = {}
    if plan.log_faults:
        worker_env = {env.FAULTS.name: plan.log_faults, env.FAULTS_SEED.name: str(plan.seed)}
    config = ClusterConfig(
        workers=plan.workers, worker_args=("--models", model, *WORKER_ARGS), worker_env=worker_env
    )
    # resume_timeout_s=0: the players resume streams themselves, each attach recorded in
    # the history the invariants are checked on (the SDK's own resume would hide some)
    async with (
        Cluster(state_dir, config) as cluster,
        Client(cluster.gateway, resume_timeout_s=0) as client,
    ):
        progress = Progress()
        players = []
        for i, script in enumerate(plan.sessions):
            info = await client.create_session(
                model,
                seed=script.model_seed,
                fps=plan.fps,
                **{**SPEC, "quality": "adaptive" if script.adaptive else "fixed"},  # type: ignore[arg-type]
            )
            if len(info.model.actions) != n_actions:
                raise RuntimeError(
                    f"{model} has {len(info.model.actions)} actions; the schedule was drawn "
                    f"for {n_actions}"
                )
            players.append(SessionPlayer(client, info, script, f"s{i}", progress))
        injector = Injector(cluster, client, [p.info.session_id for p in players], progress)
        await _play(players, injector, plan)
        await injector.restore()
        await asyncio.sleep(max(0.0, injector.last_end + SETTLE_S - time.monotonic()))
        cluster_violations = await _collect(cluster, client, players)
    histories = [p.history for p in players]
    limits = Limits(checkpoint_every=CHECKPOINT_EVERY, faults=len(injector.injected))
    violations = [v for h in histories for v in check_session(h, limits)] + cluster_violations
    result = ScheduleResult(
        plan,
        histories,
        violations,
        injector.injected,
        cluster.injected(),
        time.monotonic() - started,
        state_dir,
    )
    if not violations:
        shutil.rmtree(state_dir, ignore_errors=True)
        result.state_dir = None
    return result


async def _play(players: list[SessionPlayer], injector: Injector, plan: Schedule) -> None:
    clients_done = asyncio.Event()

    async def clients() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for player in players:
                    group.create_task(player.play(), name=f"chaos:client:{player.history.name}")
        finally:
            clients_done.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(clients(), name="chaos:clients")
        group.create_task(injector.run(plan.faults, clients_done), name="chaos:faults")


async def _collect(
    cluster: Cluster, client: Client, players: list[SessionPlayer]
) -> list[Violation]:
    """Read what the checks need into the histories; returns the cluster-wide violations."""
    for player in players:
        player.history.head = await _retry(player.head)
    async with asyncio.TaskGroup() as group:
        for player in players:
            group.create_task(player.final(), name=f"chaos:final:{player.history.name}")
    for player in players:
        info = await _retry(functools.partial(_get, client, player.info.session_id))
        if info is not None:
            player.history.final_head = int(info.head_frame)
            player.history.checkpoints = [int(c.frame_index) for c in info.checkpoints]
        await _replay(client, player.history)
    await _read_durable(cluster.nats_url, [p.history for p in players])
    violations = await _actors(cluster, len(players), "with every session open")
    for player in players:
        try:
            await client.close_session(player.info.session_id)
        except WindflowError as err:
            log.info("closing %s: %s", player.history.name, err)
    violations += await _actors(cluster, 0, "after closing every session")
    return violations


async def _get(client: Client, session_id: str) -> pb.Session | None:
    try:
        return await client.get_session(session_id)
    except WindflowError as err:
        log.info("GetSession %s: %s", session_id, err)
        return None


async def _retry(read: Callable[[], Awaitable[T | None]]) -> T | None:
    """``read()`` until it gives a value, for up to ``READ_RETRY_S``."""
    deadline = time.monotonic() + READ_RETRY_S
    while True:
        value = await read()
        if value is not None or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.5)


async def _replay(client: Client, history: SessionHistory) -> None:
    """Replay of every index the client received (up to the head) into the history."""
    delivered = [f.index for f in history.delivered]
    if not delivered:
        history.replay = {}
        return
    first, last = min(delivered), max(delivered) + 1
    if history.final_head is not None:
        last = min(last, history.final_head)
    error = ""
    deadline = time.monotonic() + READ_RETRY_S
    while True:
        try:
            frames: dict[int, Delivered] = {}
            async with asyncio.timeout(60.0):
                async for frame in client.replay(history.session_id, first, last):
                    frames[frame.index] = Delivered(
                        frame.index, frame.frame.action, digest(frame.frame.data)
                    )
            history.replay = frames
            return
        except (WindflowError, TimeoutError) as err:
            error = f"{type(err).__name__}: {err}"
            if time.monotonic() > deadline:
                history.replay_error = error
                return
            await asyncio.sleep(0.5)


async def _read_durable(nats_url: str, histories: list[SessionHistory]) -> None:
    """Each session's control log and its count of checkpoint objects."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        control_log = ControlLog(js)
        for history in histories:
            try:
                stored = await control_log.read(history.session_id)
            except WindflowError as err:
                log.info("reading the log of %s: %s", history.name, err)
                continue
            history.log = [
                LogRecord(
                    int(s.entry.frame_index),
                    int(s.entry.action),
                    claim=s.entry.kind != internal_pb2.LogEntry.KIND_CONTROL,
                )
                for s in stored
            ]
        names = await _object_names(js)
        for history in histories:
            history.objects = sum(1 for n in names if n.startswith(f"{history.session_id}."))
    finally:
        await nc.close()


async def _object_names(js: JetStreamContext) -> list[str]:
    try:
        bucket = await js.object_store(CHECKPOINT_BUCKET)
        return [info.name for info in await bucket.list(ignore_deletes=True)]
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        return []


async def _actors(cluster: Cluster, open_sessions: int, when: str) -> list[Violation]:
    """The workers' actor count against ``open_sessions``, given time to settle."""
    client = await etcd.connect(cluster.etcd_endpoint)
    try:
        deadline = time.monotonic() + ACTORS_WAIT_S
        while True:
            actors = sum(int(w.sessions) for w in await etcd.list_workers(client))
            if actors == open_sessions or time.monotonic() > deadline:
                return check_actors(open_sessions, actors, when)
            await asyncio.sleep(0.5)
    finally:
        await client.close()
