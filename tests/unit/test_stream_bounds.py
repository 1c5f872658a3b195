"""A client that floods a stream with messages and never reads (services/worker/runtime.py,
``_read_client``): the worker stops reading its messages while the stream's queue is full
(its sends then wait, by gRPC's flow control), so the answers it is owed (receipts, in-
stream errors) stay bounded; once it reads, the rest are taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

from services.worker.actor import OUT_MESSAGES_MAX
from services.worker.config import WorkerConfig
from services.worker.runtime import WorkerRuntime
from tests.fakes import FakeWorld
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

FLOOD = 3 * OUT_MESSAGES_MAX


async def test_a_flooding_client_that_never_reads_is_held_back() -> None:
    config = WorkerConfig(
        etcd="127.0.0.1:1", nats="nats://127.0.0.1:1", worker_id="w1", recheck_idle_s=0
    )
    runtime = WorkerRuntime(config, {"fake-world": FakeWorld()})
    runtime.start()
    read = 0

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        nonlocal read
        yield pb.ClientMessage(attach=pb.Attach(session_id="a"))
        for i in range(FLOOD):
            read += 1
            # refused (no such action): each owed an in-stream error
            yield pb.ClientMessage(control=pb.Control(frame_index=1000 + i, action=99))

    try:
        spec = pb.SessionSpec(model_id="fake-world", fps=24.0, steps=2, seed=1)
        await runtime.open_session(
            internal_pb2.OpenSessionRequest(session_id="a", spec=spec, epoch=1)
        )
        stream = cast(AsyncGenerator[pb.ServerMessage, None], runtime.attach(requests()))
        first = await anext(stream)
        assert first.event.kind == pb.SessionEvent.KIND_ATTACHED
        await asyncio.sleep(0.5)  # the worker reads what it will; this client reads nothing
        actor = runtime.actor("a")
        assert len(actor.out) <= OUT_MESSAGES_MAX + config.out_queue  # (+ frames, bounded)
        assert read < FLOOD, "the worker read every message of a client that never reads"
        # reading now: every refusal comes, none lost
        errors = 0
        while errors < FLOOD:
            message = await asyncio.wait_for(anext(stream), 5.0)
            errors += message.HasField("error")
        assert read == FLOOD
        await stream.aclose()
    finally:
        await runtime.aclose()
