"""A draining worker (SIGTERM: ``WorkerRuntime.drain``) takes no new session: it advertises
no free slot to the router, and a new session that reaches it anyway (the router's table
is a moment stale) is refused UNAVAILABLE, so the gateway places it elsewhere. Its attached
streams moving to other workers is tested end to end (tests/e2e/test_recovery.py)."""

from __future__ import annotations

import pytest

from services.worker.config import WorkerConfig
from services.worker.runtime import WorkerRuntime
from tests.fakes import FakeWorld
from windflow.errors import Unavailable
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb


def _request(session_id: str) -> internal_pb2.OpenSessionRequest:
    spec = pb.SessionSpec(model_id="fake-world", fps=24.0, steps=2, seed=1)
    return internal_pb2.OpenSessionRequest(session_id=session_id, spec=spec, epoch=1)


async def test_a_draining_worker_advertises_no_slot_and_refuses_new_sessions() -> None:
    config = WorkerConfig(
        etcd="127.0.0.1:1",
        nats="nats://127.0.0.1:1",
        worker_id="w1",
        capacity=4,
        recheck_idle_s=0,
    )
    published: list[internal_pb2.WorkerInfo] = []
    holder: list[WorkerRuntime] = []  # what the worker would put in etcd, at each change
    runtime = WorkerRuntime(
        config, {"fake-world": FakeWorld()}, lambda: published.append(holder[0].info())
    )
    holder.append(runtime)
    runtime.start()
    try:
        await runtime.open_session(_request("a"))
        assert (runtime.info().capacity, runtime.info().sessions) == (4, 1)
        await runtime.drain(timeout_s=1.0)
        # what the router is told at once: as many slots as sessions, none free
        assert published and (published[-1].capacity, published[-1].sessions) == (1, 1)
        with pytest.raises(Unavailable, match="w1 is shutting down"):
            await runtime.open_session(_request("b"))
        assert set(runtime.engine.sessions) == {"a"}  # the refused one left nothing behind
    finally:
        await runtime.aclose()
