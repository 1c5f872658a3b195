"""The engine's control-log append failures (``StepEngine._await_appends``): which
sessions are dropped, and with what their streams end."""

from __future__ import annotations

import asyncio

from services.worker.actor import SessionActor
from services.worker.engine import StepEngine, _Stepped
from services.worker.stepping import StepResult
from tests.fakes import FakeWorld
from windflow.common.durable import Fenced
from windflow.errors import ResourceExhausted, Unavailable
from windflow.v1 import windflow_pb2 as pb


def actor(session_id: str, model: FakeWorld) -> SessionActor:
    spec = pb.SessionSpec(model_id="fake-world", fps=24, steps=1)
    return SessionActor(
        session_id,
        spec,
        model,
        model.new_state(1),
        epoch=1,
        window=4,
        out_queue=4,
        max_pending_controls=4,
        now=0.0,
    )


async def failing(exc: BaseException | None) -> None:
    if exc is not None:
        raise exc


async def test_each_failed_append_drops_its_session_and_says_how_its_stream_ends() -> None:
    model = FakeWorld()
    engine = StepEngine({"fake-world": model}, horizon_s=0.008, step_threads=1)
    try:
        outcomes: dict[str, BaseException | None] = {
            "ok": None,
            "fenced": Fenced("the control log of session fenced has a new owner"),
            "full": ResourceExhausted("the control log of session full is full"),
            "bug": KeyError("a bug, not a WindflowError"),
        }
        actors = [actor(sid, model) for sid in outcomes]
        for a in actors:
            engine.add(a)
        appends = {i: asyncio.create_task(failing(exc)) for i, exc in enumerate(outcomes.values())}
        step = _Stepped(
            1, actors, [0] * 4, [5] * 4, [0.0] * 4, [0.0] * 4, [], appends,
            StepResult([], [], [], 0, 0, [], 0.0, []), 0, 0, 0,
        )  # fmt: skip
        unlogged = await engine._await_appends(step)

        assert unlogged == {1, 2, 3}
        assert set(engine.sessions) == {"ok"}
        lost = {a.session_id: a.lost for a in actors}
        assert lost["ok"] is None
        # a fence or an unexpected error: UNAVAILABLE, which the gateway recovers
        fenced, bug = lost["fenced"], lost["bug"]
        assert isinstance(fenced, Unavailable) and "moved to another worker" in fenced.message
        assert isinstance(bug, Unavailable) and "did not land" in bug.message
        # a full log: the client is told, no recovery would help
        assert isinstance(lost["full"], ResourceExhausted)
        assert all(a.closed for a in actors[1:])
    finally:
        await engine.aclose()
