"""A model in its own process (services.worker.model_host): the same frames, snapshots and
typed errors as the model in the caller's process, states freed when dropped, and a dead
host reported, not hung on. Real child processes; the committed built-in model."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest

from services.worker import stepping
from services.worker.model_host import ModelHost
from services.worker.models.base import Control, SessionState, WorldModel
from services.worker.models.registry import load_model
from services.worker.stepping import Capture
from windflow.errors import (
    Internal,
    InvalidArgument,
    InvalidControl,
    NotFound,
    SnapshotError,
    Unavailable,
)

MODEL = "windflow-world"


@pytest.fixture(scope="module")
def local() -> WorldModel:
    return load_model(MODEL)


@pytest.fixture
def host() -> Iterator[ModelHost]:
    h = ModelHost(MODEL)
    try:
        yield h
    finally:
        h.close()


NONE = Capture.NONE


def _controls(n: int, t: int) -> list[Control]:
    return [Control(action=(i + t) % 5) for i in range(n)]


def test_frames_snapshots_and_encodings_match_the_model_in_process(
    host: ModelHost, local: WorldModel
) -> None:
    assert host.info == local.info
    hosted = [host.new_state(seed) for seed in range(5)]
    here = [local.new_state(seed) for seed in range(5)]
    encodings = [stepping.native_encoding(local)] * 5
    copies: list[tuple[SessionState, SessionState]] = []
    for t in range(6):
        steps = 1 + t % 3
        if t % 2:
            a = host.step(hosted, _controls(5, t), steps)
            b = local.step(here, _controls(5, t), steps)
            assert a.shape == b.shape == (5, 64, 64, 3)
            assert np.array_equal(a, b)
        else:
            # one session's snapshot bytes, another's copy (kept in the host)
            mask = [
                Capture.SNAPSHOT if i == t % 5 else Capture.COPY if i == (t + 1) % 5 else NONE
                for i in range(5)
            ]
            ra = stepping.step_and_encode(host, hosted, _controls(5, t), steps, encodings, mask)
            rb = stepping.step_and_encode(local, here, _controls(5, t), steps, encodings, mask)
            assert ra.frames == rb.frames
            assert ra.snapshots == rb.snapshots
            assert sum(s is not None for s in ra.snapshots) == 1
            assert sum(c is not None for c in ra.copies) == 1
            copies += [(h, c) for h, c in zip(ra.copies, rb.copies, strict=True) if h and c]
    assert [s.frame_index for s in hosted] == [s.frame_index for s in here] == [6] * 5
    blob = host.snapshot(hosted[2])
    assert blob == local.snapshot(here[2])
    restored = host.restore(blob)
    assert (restored.frame_index, restored.seed) == (6, 2)
    assert np.array_equal(
        host.step([restored], _controls(1, 9), 2), local.step([here[2]], _controls(1, 9), 2)
    )
    # a copy stays at the frame it was taken after while its session went on, and goes on
    # from there alike on both sides
    assert [h.frame_index for h, _ in copies] == [c.frame_index for _, c in copies] == [1, 3, 5]
    same = [Control(action=2)] * 2
    for kept_there, kept_here in copies:
        frames = host.step([kept_there, host.copy(kept_there)], same, 2)
        assert np.array_equal(frames[0], frames[1])
        assert np.array_equal(frames, local.step([kept_here, local.copy(kept_here)], same, 2))


def test_the_event_loop_path_matches_the_blocking_one(host: ModelHost) -> None:
    a = [host.new_state(seed) for seed in (3, 4)]
    b = [host.new_state(seed) for seed in (3, 4)]
    encodings = [stepping.native_encoding(host)] * 2

    async def on_the_loop() -> list[bytes]:
        frames = []
        for t in range(4):
            r = await host.submit_step_and_encode(a, _controls(2, t), 2, encodings, [NONE] * 2)
            frames += r.frames
        return frames

    loop_frames = asyncio.run(on_the_loop())
    blocking = []
    for t in range(4):
        blocking += stepping.step_and_encode(
            host, b, _controls(2, t), 2, encodings, [NONE] * 2
        ).frames
    assert loop_frames == blocking
    assert [s.frame_index for s in a] == [4, 4]


def test_bad_input_raises_the_models_typed_errors(host: ModelHost, local: WorldModel) -> None:
    state = host.new_state(0)
    with pytest.raises(InvalidControl, match="outside the action space"):
        host.step([state], [Control(action=7)], 2)
    with pytest.raises(InvalidArgument):
        host.step([state], [Control()], 9)  # off the step ladder
    with pytest.raises(SnapshotError):
        host.restore(b"not a snapshot")
    with pytest.raises(InvalidArgument, match="not made by model host"):
        host.step([local.new_state(0)], [Control()], 2)
    assert state.frame_index == 0  # nothing was stepped
    assert host.step([state], [Control()], 2).shape == (1, 64, 64, 3)  # and it still serves


def test_dropped_states_are_freed_in_the_host(host: ModelHost) -> None:
    kept = host.new_state(0)
    states = [host.new_state(seed) for seed in range(1, 21)]
    assert host.live_states() == 21
    del states
    gc.collect()
    assert host.live_states() == 1
    assert host.step([kept], [Control()], 1).shape[0] == 1


def test_unknown_model_fails_at_start() -> None:
    with pytest.raises(NotFound, match="unknown model"):
        ModelHost("no-such-model")


def test_a_dead_host_raises_unavailable_and_its_exit_is_seen(host: ModelHost) -> None:
    state = host.new_state(0)
    os.kill(host.process.pid, signal.SIGKILL)
    assert host.wait_exit() == -signal.SIGKILL
    with pytest.raises(Unavailable, match="died"):
        host.step([state], [Control()], 2)
    with pytest.raises(Unavailable, match="gone"):
        host.snapshot(state)


def test_queued_calls_from_the_loop_are_answered_in_order(host: ModelHost) -> None:
    """Batches written while earlier ones run (the engine's pipeline): each caller gets
    its own reply, the same as one call at a time; a caller that gives up does not shift
    the replies of the others."""
    queued = [host.new_state(seed) for seed in (5, 6)]
    serial = [host.new_state(seed) for seed in (5, 6)]
    spare = host.new_state(9)
    encodings = [stepping.native_encoding(host)] * 2

    async def queue_them() -> list[list[bytes]]:
        calls = [
            host.submit_step_and_encode(queued, _controls(2, t), 2, encodings, [NONE] * 2)
            for t in range(4)
        ]
        assert len(host._pending) == 4  # all four written before the first reply
        abandoned = host.submit_step_and_encode([spare], _controls(1, 0), 1, encodings[:1], [NONE])
        abandoned.cancel()
        results = [(await c).frames for c in calls]
        late = await host.submit_step_and_encode(queued, _controls(2, 4), 2, encodings, [NONE] * 2)
        return [*results, late.frames]

    got = asyncio.run(queue_them())
    want = [
        stepping.step_and_encode(host, serial, _controls(2, t), 2, encodings, [NONE] * 2).frames
        for t in range(5)
    ]
    assert got == want
    assert [s.frame_index for s in queued] == [5, 5]


def test_a_blocking_call_gets_in_between_queued_batches(host: ModelHost) -> None:
    """A restore or snapshot from the step thread while the loop keeps two batches out:
    the queue drains for it instead of starving it."""
    states = [host.new_state(seed) for seed in range(4)]
    other = host.new_state(42)
    encodings = [stepping.native_encoding(host)] * 4

    async def busy() -> int:
        snapshot = asyncio.ensure_future(asyncio.to_thread(host.snapshot, other))
        out: list[asyncio.Future[stepping.StepResult]] = []
        rounds = 0
        while not snapshot.done():
            assert rounds < 50, "the blocking call never got in"
            while len(out) < 2:
                out.append(
                    host.submit_step_and_encode(
                        states, _controls(4, rounds), 1, encodings, [NONE] * 4
                    )
                )
            await out.pop(0)
            rounds += 1
        for call in out:
            await call
        assert (await snapshot)[:8] == b"WFWSNAP1"
        return rounds

    assert asyncio.run(busy()) >= 1


def test_queued_calls_to_a_host_that_dies_all_raise_unavailable(host: ModelHost) -> None:
    states = [host.new_state(seed) for seed in range(8)]
    encodings = [stepping.native_encoding(host)] * 8

    async def queue_then_kill() -> list[BaseException | stepping.StepResult]:
        calls = [
            host.submit_step_and_encode(states, _controls(8, t), 4, encodings, [NONE] * 8)
            for t in range(3)
        ]
        await asyncio.sleep(0)
        os.kill(host.process.pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)

    results = asyncio.run(queue_then_kill())
    assert any(isinstance(r, Unavailable) for r in results)
    assert all(isinstance(r, (Unavailable, stepping.StepResult)) for r in results)
    assert host.lost


def test_a_call_that_waited_for_a_thread_is_not_overtaken(host: ModelHost) -> None:
    """A batch that had to wait for a thread's call goes out before a later one that
    would not have to wait: a session's frames are made in order."""
    queued = host.new_state(3)
    serial = host.new_state(3)
    encodings = [stepping.native_encoding(host)]

    async def around_a_thread_call() -> list[bytes]:
        host._lock.acquire()  # as a thread's restore holds it
        first = host.submit_step_and_encode([queued], _controls(1, 1), 2, encodings, [NONE])
        host._lock.release()  # the thread is done before the next call
        second = host.submit_step_and_encode([queued], _controls(1, 2), 2, encodings, [NONE])
        return [*(await first).frames, *(await second).frames]

    got = asyncio.run(around_a_thread_call())
    want = [
        stepping.step_and_encode(host, [serial], _controls(1, t), 2, encodings, [NONE]).frames[0]
        for t in (1, 2)
    ]
    assert got == want and got[0] != got[1]


def test_a_blocking_call_on_the_loop_with_batches_out_is_refused_not_a_deadlock(
    host: ModelHost,
) -> None:
    """The loop holds the host while its batches are out and reads their replies itself:
    a blocking call made on the loop then could only wait forever. It fails at once."""
    state = host.new_state(1)
    encodings = [stepping.native_encoding(host)]

    async def on_the_loop() -> bytes:
        out = host.submit_step_and_encode([state], _controls(1, 0), 2, encodings, [NONE])
        with pytest.raises(Internal, match="deadlock"):
            host.snapshot(state)
        await out
        return host.snapshot(state)  # nothing out now: allowed, and the host still serves

    assert asyncio.run(on_the_loop())[:8] == b"WFWSNAP1"
