"""Session state under faults (issue 18's review cases), each against the real stack.

The rule every test holds: what the client received, Replay and the control log agree,
frame by frame, after the fault; no frame is missing or repeated; a refused control is
never applied; and the session is still playable.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.v1 import windflow_pb2 as pb

WORKER_ARGS = ("--lease-ttl", "2", "--heartbeat", "0.5", "--checkpoint-every", "48")
SPEC = {"format": "rgb", "output_policy": "pause", "fps": 48.0, "quality": "fixed"}


async def _new(client: Client, seed: int) -> pb.Session:
    return await client.create_session(DEFAULT_MODEL, seed=seed, **SPEC)  # type: ignore[arg-type]


async def _replayed(client: Client, session_id: str, start: int, stop: int) -> list[bytes]:
    return [f.frame.data async for f in client.replay(session_id, start, stop)]


async def _reopened(client: Client, session_id: str, *, epoch: int) -> pb.Session:
    """The session once it is placed at ``epoch`` and its new worker holds it (the
    placement moves first, then the worker opens it); as it is after 10 s otherwise."""
    for _ in range(200):
        moved = await client.get_session(session_id)
        if moved.placement_epoch == epoch and moved.head_frame > 0:
            break
        await asyncio.sleep(0.05)
    return moved


def _recovered(live: Session) -> list[pb.SessionEvent]:
    return [e for e in live.events if e.kind == pb.SessionEvent.KIND_RECOVERED]


async def test_append_errors_of_every_kind_hold_the_frame_and_lose_nothing(
    tmp_path: Path,
) -> None:
    """Scenarios 3 and 5: the control-log append for frame 5 meets each client error
    nats-py raises there (no stream response, a closed connection, a full outbound buffer,
    a 503, a timeout), one after the other. Before: the first escaped as a non-Windflow
    error, frame 5 was never sent (frames 4 then 6) and the log never got its entry;
    a 503 alone removed the session from its worker for good. Now the append is retried
    (idempotently) and frame 5 waits for it."""
    errors = (
        "NoStreamResponseError",
        "ConnectionClosedError",
        "OutboundBufferLimitError",
        "ServiceUnavailableError",
        "NatsTimeoutError",
    )
    rules = ";".join(f"log.append={name}@{call}" for call, name in enumerate(errors, start=2))
    mesh = Mesh(tmp_path, workers=1, worker_args=WORKER_ARGS, env={"WINDFLOW_FAULTS": rules})
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=5)
            live = await client.attach(info, controls=[(0, 1), (5, 2), (10, 3)])
            got = [(f.index, f.frame.action, f.frame.data) async for f in live.frames(limit=14)]
            await live.aclose()

            assert [i for i, _, _ in got] == list(range(14))
            assert [a for _, a, _ in got] == [1] * 5 + [2] * 5 + [3] * 4
            assert not live.errors and not _recovered(live)
            # the log holds frame 5's entry: Replay makes what the client saw
            assert await _replayed(client, info.session_id, 0, 14) == [d for _, _, d in got]
            worker_log = mesh.log("worker-1")
            assert worker_log.count("fault injected at log.append") == len(errors)
            assert "landed after 6 tries" in worker_log
            # and it plays on, from its head (the worker may have made a frame or two
            # past what the client read before it detached)
            placed = await client.get_session(info.session_id)
            assert 14 <= placed.head_frame <= 14 + 16
            again = await client.attach(placed)
            head = placed.head_frame
            assert [f.index async for f in again.frames(limit=3)] == [head, head + 1, head + 2]
            await again.aclose()
    finally:
        await mesh.aclose()


async def test_a_detached_session_recovered_without_its_client_comes_back_at_its_head(
    tmp_path: Path,
) -> None:
    """Scenario 1: 120 frames under changing controls, detach, SIGKILL the worker. The
    lease expiry re-places the session with no client. Before: it came back at its newest
    checkpoint (96), and the frames made again from there ignored the logged controls
    (99-115 differed). Now it comes back at 120, and Replay of the whole history equals
    what the client received, before and after."""
    mesh = Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS)
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=11)
            n = len(info.model.actions)
            controls = [(f, (f // 7) % n) for f in range(0, 120, 7)]
            live = await client.attach(info, controls=controls)
            first = [f.frame.data async for f in live.frames(limit=120)]
            await live.aclose()
            placed = await client.get_session(info.session_id)
            assert placed.head_frame == 120
            await asyncio.sleep(0.5)  # its HEAD entry lands after the stream's end
            mesh.kill(placed.worker_id)
            moved = await _reopened(client, info.session_id, epoch=2)
            assert moved.placement_epoch == 2 and moved.worker_id != placed.worker_id
            assert moved.head_frame == 120

            again = await client.attach(moved)
            second = [(f.index, f.frame.data) async for f in again.frames(limit=20)]
            await again.aclose()
            assert [i for i, _ in second] == list(range(120, 140))
            history = first + [d for _, d in second]
            assert await _replayed(client, info.session_id, 0, 140) == history
    finally:
        await mesh.aclose()


async def test_a_detached_session_whose_worker_dies_before_its_head_entry_lands(
    tmp_path: Path,
) -> None:
    """The worker records a detached session's head in its log once its frames settle; if
    it dies first (here: that HEAD entry never lands), the gateway's record of where the
    client left the session brings it back there. (A chaos run, seed 3010: the worker
    was killed as the client detached at 131; the session came back at its checkpoint
    96, and frames the client had seen were made again under a new control.)"""
    mesh = Mesh(
        tmp_path,
        workers=2,
        worker_args=WORKER_ARGS,
        env={"WINDFLOW_FAULTS": "log.head=ServiceUnavailableError@1+"},
    )
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=13)
            n = len(info.model.actions)
            # the last control entry is at 119: the log alone says head 120, not 125
            controls = [(f, (f // 7) % n) for f in range(0, 120, 7)]
            live = await client.attach(info, controls=controls)
            first = [f.frame.data async for f in live.frames(limit=125)]
            await live.aclose()
            await asyncio.sleep(0.3)  # the gateway's record lands; the HEAD entry cannot
            placed = await client.get_session(info.session_id)
            mesh.kill(placed.worker_id)
            moved = await _reopened(client, info.session_id, epoch=2)
            assert (moved.placement_epoch, moved.head_frame) == (2, 125)
            again = await client.attach(moved, controls=[(130, 1)])
            second = [(f.index, f.frame.data) async for f in again.frames(limit=10)]
            await again.aclose()
            assert [i for i, _ in second] == list(range(125, 135))
            history = first + [d for _, d in second]
            assert await _replayed(client, info.session_id, 0, 135) == history
            assert "fault injected at log.head" in mesh.log(placed.worker_id)
    finally:
        await mesh.aclose()


async def test_a_worker_stalled_past_its_lease_hands_the_stream_on(tmp_path: Path) -> None:
    """Scenario 4: SIGSTOP the worker streaming a session for 3.5 s (lease 2 s): the router
    finds it gone and re-places the session. When it wakes, the old worker must neither
    end the client's stream as if the session were closed (before: 63 of 200 frames and a
    clean end, the session left unattached on the other worker) nor go on streaming it
    (a session whose control does not change needs no append, so no log fence stops it:
    the client got frames the new owner never made, and a later attach repeated them).
    Past its lease it verifies its placements before any frame goes out, drops the
    session, ends its stream UNAVAILABLE, and the gateway follows the session. (The
    periodic placement check is off here: overdue when the worker wakes, it would race
    the fence to the same result.)"""
    mesh = Mesh(tmp_path, workers=2, worker_args=(*WORKER_ARGS, "--placement-check-s", "0"))
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=23)
            n = len(info.model.actions)
            victim = info.worker_id
            pid = mesh.procs[victim].pid
            assert pid is not None
            live = await client.attach(info, controls=[(0, 1), (9, 2 % n)])
            got: list[tuple[int, bytes]] = []
            async for frame in live.frames(limit=120):
                got.append((frame.index, frame.frame.data))
                if frame.index == 60:
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        await asyncio.sleep(3.5)
                    finally:
                        os.kill(pid, signal.SIGCONT)
            await live.aclose()
            assert [i for i, _ in got] == list(range(120))
            assert _recovered(live), "the stream never left the stalled worker"

            # a fresh attach starts at the head: after what the client saw, never before
            placed = await client.get_session(info.session_id)
            assert placed.worker_id != victim and placed.placement_epoch >= 2
            again = await client.attach(placed)
            later = [(f.index, f.frame.data) async for f in again.frames(limit=10)]
            await again.aclose()
            head = later[0][0]
            assert 120 <= head <= 120 + 16
            assert [i for i, _ in later] == list(range(head, head + 10))
            replayed = await _replayed(client, info.session_id, 0, head + 10)
            assert replayed[:120] == [d for _, d in got]
            assert replayed[head:] == [d for _, d in later]
            # the stalled worker let its stale copy go (no slot or memory kept for it)
            assert "dropped here" in mesh.log(victim)
    finally:
        await mesh.aclose()


async def test_refused_and_many_future_controls_survive_a_recovery(tmp_path: Path) -> None:
    """Scenario 2: the client keeps ~250 controls queued ahead (under the worker's bound of
    256, but with the frames made and not yet delivered the gateway remembers more) and
    one out-of-range action for frame 150, refused. The worker is killed at frame 100.
    Before: the resume Attach re-sent every remembered control, all or none: the stream
    ended RESOURCE_EXHAUSTED (over 256) or INVALID_ARGUMENT (the refused one). Now the
    refused control is forgotten, the others resume, and every frame arrives as Replay
    makes it."""
    mesh = Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS)
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=31)
            n = len(info.model.actions)
            ahead = 250

            def action(frame: int) -> int:
                return (frame // 5) % n

            live = await client.attach(info, controls=[(f, action(f)) for f in range(ahead)])
            await live.send(action=n + 7, frame_index=150)  # out of range: refused
            got: list[tuple[int, int, bytes]] = []
            async for frame in live.frames(limit=200):
                got.append((frame.index, frame.frame.action, frame.frame.data))
                await live.send(action=action(frame.index + ahead), frame_index=frame.index + ahead)
                if frame.index == 100:
                    mesh.kill(info.worker_id)
            await live.aclose()

            assert [i for i, _, _ in got] == list(range(200))
            assert [a for _, a, _ in got] == [action(i) for i in range(200)]
            assert len(_recovered(live)) == 1
            refusals = [e for e in live.errors if e.code_name == "INVALID_ARGUMENT"]
            assert [(e.frame_index, e.control.action) for e in refusals] == [(150, n + 7)]
            assert await _replayed(client, info.session_id, 0, 200) == [d for _, _, d in got]
    finally:
        await mesh.aclose()


async def test_a_rewind_waits_for_the_append_in_flight_and_drops_it(tmp_path: Path) -> None:
    """Scenario 8: the append of frame 10's control is held up (503s, retried) when the
    client rewinds to frame 7. The rewind waits for it, then drops it with the rest of
    the abandoned future. (Not waiting, the retried append landed after the truncation,
    fenced on the truncated log's sequence: the log kept frame 10's entry, and Replay
    applied it to frames the client received without it.)"""
    rules = "log.append=ServiceUnavailableError@3-9"  # the third append: frame 10's
    mesh = Mesh(tmp_path, workers=1, worker_args=WORKER_ARGS, env={"WINDFLOW_FAULTS": rules})
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=41)
            live = await client.attach(info, controls=[(0, 1), (5, 2), (10, 3)])
            seen: list[tuple[int, int, bytes]] = []
            rewinding: asyncio.Task[pb.Session] | None = None
            async for frame in live.frames(limit=45):
                seen.append((frame.index, frame.frame.action, frame.frame.data))
                if frame.index == 9 and rewinding is None:
                    rewinding = asyncio.create_task(client.rewind(info.session_id, 7))
            await live.aclose()
            assert rewinding is not None
            await rewinding

            cut = next(i for i in range(1, len(seen)) if seen[i][0] < seen[i - 1][0])
            before, after = seen[:cut], seen[cut:]
            assert [i for i, _, _ in before] == list(range(len(before)))
            assert [i for i, _, _ in after] == list(range(7, 7 + len(after)))
            assert {a for i, a, _ in after} == {2}  # frame 10's control went with the rewind
            history = [d for _, _, d in before[:7]] + [d for _, _, d in after]
            assert await _replayed(client, info.session_id, 0, 7 + len(after)) == history
    finally:
        await mesh.aclose()


async def test_a_hung_worker_loses_no_stream(tmp_path: Path) -> None:
    """The worker streaming a session hangs for good (SIGSTOP, never continued): its
    connections stay open, so the gateway's leg neither ends nor errs. The router moves
    the session when the worker's lease ends; the gateway, watching the placement, leaves
    the hung leg and resumes on the new worker. (Before, the client's stream waited on the
    hung leg for as long as the worker hung.)"""
    mesh = Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS)
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=47)
            n = len(info.model.actions)
            pid = mesh.procs[info.worker_id].pid
            assert pid is not None
            live = await client.attach(
                info, controls=[(f, (f // 11) % n) for f in range(0, 150, 11)]
            )
            got: list[tuple[int, bytes]] = []
            async with asyncio.timeout(60):
                async for frame in live.frames(limit=150):
                    got.append((frame.index, frame.frame.data))
                    if frame.index == 40:
                        os.kill(pid, signal.SIGSTOP)  # (Mesh.aclose kills it)
            await live.aclose()

            assert [i for i, _ in got] == list(range(150))
            assert len(_recovered(live)) == 1
            assert await _replayed(client, info.session_id, 0, 150) == [d for _, d in got]
            assert "switching legs" in mesh.log("gateway")
    finally:
        await mesh.aclose()


async def test_get_session_on_a_stalled_worker_reports_the_delivered_head(
    tmp_path: Path,
) -> None:
    """GetSession while the worker holding the session is stalled (SIGSTOP; it answers
    nothing): the head is the one its clients were delivered up to, quickly, not the
    record's 0 after the full RPC timeout (a chaos schedule saw a fresh attach find head 0
    while the session's worker was stopped, then begin at frame 141)."""
    mesh = Mesh(tmp_path, workers=1, worker_args=WORKER_ARGS)
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            info = await _new(client, seed=31)
            live = await client.attach(info)
            got = [f.index async for f in live.frames(limit=30)]
            await live.aclose()
            assert got == list(range(30))
            for _ in range(50):  # the stream's end is recorded off its task
                if (await client.get_session(info.session_id)).head_frame >= 30:
                    break
                await asyncio.sleep(0.1)
            pid = mesh.procs[info.worker_id].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                started = asyncio.get_running_loop().time()
                stalled = await client.get_session(info.session_id)
                took = asyncio.get_running_loop().time() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            assert stalled.head_frame >= 30
            assert took < 5.0, f"GetSession took {took:.1f} s on a stalled worker"
    finally:
        await mesh.aclose()
