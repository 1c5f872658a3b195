"""A worker lets go of the sessions it no longer owns: those its placement check finds
moved away or closed, and a stale copy replaced by an OpenSession at a newer epoch. Each
one's attached stream would end UNAVAILABLE (``SessionActor.lost``), so that its gateway
follows the session; the slot and the state go."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.worker.config import WorkerConfig
from services.worker.runtime import WorkerRuntime
from tests.fakes import FakeWorld
from windflow.errors import FailedPrecondition, Unavailable
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb


def _open(session_id: str, epoch: int = 1) -> internal_pb2.OpenSessionRequest:
    spec = pb.SessionSpec(model_id="fake-world", fps=24.0, steps=2, seed=1)
    return internal_pb2.OpenSessionRequest(session_id=session_id, spec=spec, epoch=epoch)


@pytest.fixture
async def runtime() -> AsyncIterator[WorkerRuntime]:
    config = WorkerConfig(
        etcd="127.0.0.1:1", nats="nats://127.0.0.1:1", worker_id="w1", capacity=4, recheck_idle_s=0
    )
    runtime = WorkerRuntime(config, {"fake-world": FakeWorld()})
    runtime.start()
    try:
        yield runtime
    finally:
        await runtime.aclose()


async def test_the_placement_check_drops_moved_and_closed_sessions(runtime: WorkerRuntime) -> None:
    for sid in ("kept", "moved", "newer", "closed"):
        await runtime.open_session(_open(sid))
    actors = dict(runtime.engine.sessions)
    records = {
        "kept": internal_pb2.PlacementRecord(worker_id="w1", epoch=1),
        "moved": internal_pb2.PlacementRecord(worker_id="w2", epoch=2),
        "newer": internal_pb2.PlacementRecord(worker_id="w1", epoch=3),  # placed back here
    }

    async def placement_of(session_id: str) -> internal_pb2.PlacementRecord | None:
        return records.get(session_id)

    assert await runtime.check_placements(placement_of) == 3
    assert set(runtime.engine.sessions) == {"kept"}
    assert actors["kept"].lost is None
    for sid, why in (("moved", "placed on w2 at epoch 2"), ("closed", "it was closed")):
        lost = actors[sid].lost
        assert isinstance(lost, Unavailable) and why in lost.message and actors[sid].closed
    assert runtime.info().sessions == 1  # their slots are free


async def test_an_open_at_a_newer_epoch_replaces_a_stale_copy(runtime: WorkerRuntime) -> None:
    await runtime.open_session(_open("s", epoch=1))
    stale = runtime.engine.sessions["s"]
    await runtime.open_session(_open("s", epoch=1))  # a retried open: the same actor
    assert runtime.engine.sessions["s"] is stale
    await runtime.open_session(_open("s", epoch=3))
    fresh = runtime.engine.sessions["s"]
    assert fresh is not stale and fresh.epoch == 3
    assert isinstance(stale.lost, Unavailable) and stale.closed
    with pytest.raises(FailedPrecondition, match="newer than 2"):
        await runtime.open_session(_open("s", epoch=2))  # an open older than what it holds
    assert runtime.status("s").epoch == 3


async def test_a_session_dropped_while_a_resume_brings_it_back_ends_that_attach_unavailable(
    runtime: WorkerRuntime,
) -> None:
    """A resume attach brings the session to its frame (awaits: a replay, a restore); if
    the session is dropped meanwhile (its placement moved), the attach must end
    UNAVAILABLE for the gateway to follow it, not fail on the missing session (a chaos
    run: INTERNAL, KeyError from the quality governor)."""
    await runtime.open_session(_open("s"))

    async def dropped_meanwhile(actor: object, frame: int) -> None:
        runtime.engine.drop("s", Unavailable("session s is placed on w2 at epoch 2"))

    runtime._bring_to = dropped_meanwhile  # type: ignore[method-assign]

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        yield pb.ClientMessage(attach=pb.Attach(session_id="s", resume=True, resume_from=5))

    with pytest.raises(Unavailable, match="placed on w2"):
        async for _ in runtime.attach(requests()):
            pass
