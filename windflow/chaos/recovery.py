"""``recovery_all_ms``: a worker holding many streaming sessions is killed; how long until
the last of them has its next frame.

One worker (room for every session) starts alone and takes all the sessions, each streamed
by its own client; once each has ``frames_before`` frames a second worker is started, and
when it serves, the first is SIGKILLed. Each session's recovery is timed from the kill to
the first frame after its KIND_RECOVERED event (the first the new worker made; frames on
the way when the old one died come before the event); ``recovery_all_ms`` is the slowest.
Every session's frames are checked to be contiguous, once each, and its stream unbroken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.worker.models.registry import DEFAULT_MODEL
from windflow.chaos.cluster import Cluster, ClusterConfig
from windflow.chaos.history import AttachRecord, Delivered, SessionHistory, Violation, check_session
from windflow.chaos.player import FRAME_TIMEOUT_S, digest
from windflow.chaos.runner import SPEC, WORKER_ARGS
from windflow.errors import WindflowError
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)

RECOVERY_DEADLINE_S = 30.0
"""How long after the kill a session may take to recover before it counts as lost (and,
before the kill, how long the sessions may take to reach ``frames_before``)."""


@dataclass(slots=True)
class RecoveryResult:
    sessions: int
    recovery_all_ms: float | None
    """None when a session never recovered."""
    recovery_ms: list[float] = field(default_factory=list)
    """Each recovered session's, sorted."""
    sessions_lost: int = 0
    violations: list[Violation] = field(default_factory=list)
    state_dir: Path | None = None


@dataclass(slots=True)
class _Stream:
    history: SessionHistory
    record: AttachRecord
    recovered_us: int | None = None
    """Arrival of the first frame after KIND_RECOVERED."""


class _Phase:
    """What the streams and the killer share: when every stream is ready, and the kill."""

    def __init__(self, streams: list[_Stream], frames_before: int) -> None:
        self.streams = streams
        self.frames_before = frames_before
        self.ready = asyncio.Event()
        self.killed = asyncio.Event()
        self.killed_us = 0

    def on_frame(self) -> None:
        if all(len(s.record.frames) >= self.frames_before for s in self.streams):
            self.ready.set()

    def overdue(self) -> bool:
        """Past the time a recovery may take, or no kill while the streams are stuck."""
        if not self.killed.is_set():
            return False
        return time.time_ns() // 1000 - self.killed_us > RECOVERY_DEADLINE_S * 1e6


async def recovery_all(
    state_dir: Path,
    *,
    sessions: int = 16,
    fps: float = 24.0,
    frames_before: int = 24,
    frames_after: int = 24,
    model: str = DEFAULT_MODEL,
) -> RecoveryResult:
    config = ClusterConfig(workers=1, worker_args=("--models", model, *WORKER_ARGS))
    # resume_timeout_s=0: the players resume streams themselves, each attach recorded in
    # the history the invariants are checked on (the SDK's own resume would hide some)
    async with (
        Cluster(state_dir, config) as cluster,
        Client(cluster.gateway, resume_timeout_s=0) as client,
    ):
        infos = [
            await client.create_session(model, seed=i, fps=fps, **SPEC)  # type: ignore[arg-type]
            for i in range(sessions)
        ]
        streams = [
            _Stream(SessionHistory(f"r{i}", info.session_id), AttachRecord())
            for i, info in enumerate(infos)
        ]
        phase = _Phase(streams, frames_before)

        async def kill_when_ready() -> None:
            with contextlib.suppress(TimeoutError):  # killed anyway: the streams must end
                async with asyncio.timeout(RECOVERY_DEADLINE_S):
                    await phase.ready.wait()
            await cluster.add_worker()
            phase.killed_us = time.time_ns() // 1000
            cluster.signal(cluster.workers[0], signal.SIGKILL)
            log.info("killed %s holding %d sessions", cluster.workers[0], sessions)
            phase.killed.set()

        async with asyncio.TaskGroup() as group:
            group.create_task(kill_when_ready(), name="chaos:recovery:kill")
            for info, stream in zip(infos, streams, strict=True):
                group.create_task(
                    _play(client, info, stream, phase, frames_after),
                    name=f"chaos:recovery:{stream.history.name}",
                )
    result = RecoveryResult(sessions, None, state_dir=state_dir)
    times = [(s.recovered_us - phase.killed_us) / 1000.0 for s in streams if s.recovered_us]
    result.recovery_ms = sorted(times)
    if len(times) == sessions:
        result.recovery_all_ms = max(times)
    for stream in streams:
        stream.history.attaches.append(stream.record)
        if stream.recovered_us is None:
            stream.history.lost = "never recovered after its worker was killed"
        kept = ("gap", "repeat", "stream", "lost")
        result.violations += [v for v in check_session(stream.history) if v.kind in kept]
    result.sessions_lost = sum(1 for s in streams if s.history.lost)
    return result


async def _play(
    client: Client, info: pb.Session, stream: _Stream, phase: _Phase, frames_after: int
) -> None:
    """Stream until ``frames_after`` frames came after the recovery (or the stream fails)."""
    live = await client.attach(info, controls=[(0, 1)])
    record = stream.record
    after = 0
    try:
        async with asyncio.timeout(FRAME_TIMEOUT_S) as timer:
            async for frame in live.frames():
                timer.reschedule(asyncio.get_running_loop().time() + FRAME_TIMEOUT_S)
                data = frame.frame
                record.frames.append(Delivered(frame.index, data.action, digest(data.data)))
                phase.on_frame()
                recovered = any(e.kind == pb.SessionEvent.KIND_RECOVERED for e in live.events)
                if stream.recovered_us is None and recovered:
                    stream.recovered_us = frame.received_us
                if stream.recovered_us is not None:
                    after += 1
                if after >= frames_after or phase.overdue():
                    return
    except TimeoutError:
        record.end = f"stalled: no frame for {FRAME_TIMEOUT_S:.0f} s"
    except WindflowError as err:
        record.end = f"{err.code}: {err}"
    else:
        record.end = "ended normally"
    finally:
        await live.aclose()
