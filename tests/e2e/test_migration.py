"""Live migration against the real stack (docs/migration.md): sessions move between
workers while they stream, and the client sees every frame once, identical to Replay,
with one KIND_MIGRATED event per move and no recovery."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import nats
import pytest

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.common import grpc_util, names
from windflow.sdk import Client
from windflow.sdk.client import Session
from windflow.v1 import internal_pb2, internal_pb2_grpc
from windflow.v1 import windflow_pb2 as pb

WORKER_ARGS = ("--lease-ttl", "2", "--heartbeat", "0.5")
SPEC = {"format": "rgb", "output_policy": "pause", "fps": 24.0, "quality": "fixed"}


def _router(mesh: Mesh) -> tuple[grpc.aio.Channel, internal_pb2_grpc.RouterStub]:
    channel = grpc_util.channel(mesh.addresses["router"])
    return channel, internal_pb2_grpc.RouterStub(channel)


def _kinds(live: Session, kind: int) -> list[pb.SessionEvent]:
    return [e for e in live.events if e.kind == kind]


class Player:
    """Reads a session's frames in a task; ``at(n)`` returns once frame n arrived."""

    def __init__(self, live: Session, frames: int) -> None:
        self.got: list[tuple[int, bytes, float]] = []
        self._marks: dict[int, asyncio.Event] = {}
        self.task = asyncio.create_task(self._run(live, frames))

    async def _run(self, live: Session, frames: int) -> list[tuple[int, bytes, float]]:
        async for f in live.frames(limit=frames):
            self.got.append((f.index, f.frame.data, time.monotonic()))
            for mark in [m for m in self._marks if m <= f.index]:
                self._marks.pop(mark).set()
        return self.got

    async def at(self, frame: int) -> None:
        if self.got and self.got[-1][0] >= frame:
            return
        await self._marks.setdefault(frame, asyncio.Event()).wait()


async def _replayed(client: Client, session_id: str, stop: int) -> list[bytes]:
    return [f.frame.data async for f in client.replay(session_id, 0, stop)]


async def test_a_streaming_session_migrates_there_and_back_without_a_lost_frame(
    tmp_path: Path,
) -> None:
    """Two moves of a session under changing controls: every frame arrives once, in
    order, bit-identical to Replay; the client sees KIND_MIGRATED twice (with the workers
    and the cut-over frame) and never KIND_RECOVERED; the session ends where it was sent."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS) as mesh:
        channel, router = _router(mesh)
        async with Client(mesh.gateway) as client, channel:
            info = await client.create_session(DEFAULT_MODEL, seed=3, **SPEC)  # type: ignore[arg-type]
            n = len(info.model.actions)
            controls = [(f, (f // 5) % n) for f in range(0, 160, 5)]
            live = await client.attach(info, controls=controls)
            play = Player(live, 150)
            other = "worker-2" if info.worker_id == "worker-1" else "worker-1"
            await play.at(30)
            there = await router.Migrate(
                internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id=other)
            )
            await play.at(90)
            back = await router.Migrate(
                internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id=info.worker_id)
            )
            got = await play.task
            await live.aclose()

            assert [i for i, _, _ in got] == list(range(150))
            assert (there.from_worker_id, there.to_worker_id) == (info.worker_id, other)
            assert (back.from_worker_id, back.to_worker_id) == (other, info.worker_id)
            assert 30 <= there.cutover_frame < back.cutover_frame < 150
            migrated = _kinds(live, pb.SessionEvent.KIND_MIGRATED)
            assert [(e.from_worker_id, e.worker_id, e.frame_index) for e in migrated] == [
                (info.worker_id, other, there.cutover_frame),
                (other, info.worker_id, back.cutover_frame),
            ]
            assert not _kinds(live, pb.SessionEvent.KIND_RECOVERED)
            assert not live.errors
            assert await _replayed(client, info.session_id, 150) == [d for _, d, _ in got]
            placed = await client.get_session(info.session_id)
            assert (placed.worker_id, placed.placement_epoch) == (info.worker_id, 3)
            assert placed.region == "local"


async def test_migrate_refuses_bad_requests_with_the_right_status(tmp_path: Path) -> None:
    """Unknown session: NOT_FOUND; unknown worker or region: INVALID_ARGUMENT; to the
    worker it is on, or while it migrates already: FAILED_PRECONDITION. A refused move
    leaves the session streaming where it was."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS) as mesh:
        channel, router = _router(mesh)
        async with Client(mesh.gateway) as client, channel:
            info = await client.create_session(DEFAULT_MODEL, seed=4, **SPEC)  # type: ignore[arg-type]
            live = await client.attach(info)
            play = Player(live, 60)
            await play.at(5)
            cases = [
                (internal_pb2.MigrateRequest(session_id="nope"), grpc.StatusCode.NOT_FOUND),
                (
                    internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id="w-9"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    internal_pb2.MigrateRequest(session_id=info.session_id, region="mars"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    internal_pb2.MigrateRequest(
                        session_id=info.session_id, to_worker_id=info.worker_id
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                ),
            ]
            for request, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await router.Migrate(request)
                assert refused.value.code() == code, request
            # two at once: one moves it, the other is refused
            outcomes = await asyncio.gather(
                router.Migrate(internal_pb2.MigrateRequest(session_id=info.session_id)),
                router.Migrate(internal_pb2.MigrateRequest(session_id=info.session_id)),
                return_exceptions=True,
            )
            errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.FAILED_PRECONDITION
            got = await play.task
            await live.aclose()
            assert [i for i, _, _ in got] == list(range(60))
            assert len(_kinds(live, pb.SessionEvent.KIND_MIGRATED)) == 1
            assert await _replayed(client, info.session_id, 60) == [d for _, d, _ in got]


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "windflow",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_drain_moves_every_streaming_session_and_takes_nothing_new(
    tmp_path: Path,
) -> None:
    """Four sessions stream on worker-1; worker-2 joins; ``windflow drain worker-1``
    moves all four live (one KIND_MIGRATED each, every frame once and equal to Replay),
    shows progress, and worker-1 takes no new session until ``--undo``."""
    async with Mesh(tmp_path, workers=1, worker_args=WORKER_ARGS) as mesh:
        async with Client(mesh.gateway) as client:
            infos = [
                await client.create_session(DEFAULT_MODEL, seed=20 + i, **SPEC)  # type: ignore[arg-type]
                for i in range(4)
            ]
            n = len(infos[0].model.actions)
            lives = [
                await client.attach(
                    info, controls=[(f, (f // 4 + i) % n) for f in range(0, 120, 4)]
                )
                for i, info in enumerate(infos)
            ]
            players = [Player(live, 110) for live in lives]
            await mesh.add_worker().wait_ready()
            await asyncio.gather(*(p.at(20) for p in players))
            code, out, err = await _cli("drain", "--router", mesh.addresses["router"], "worker-1")
            assert code == 0, err
            summary = json.loads(out.strip().splitlines()[-1])
            assert (summary["migrated"], summary.get("failed", 0)) == (4, 0)
            assert err.count("drain worker-1: ") >= 5  # the start and one line per session
            fresh = await client.create_session(DEFAULT_MODEL, seed=99, **SPEC)  # type: ignore[arg-type]
            assert fresh.worker_id == "worker-2"
            for info, live, player in zip(infos, lives, players, strict=True):
                got = await player.task
                await live.aclose()
                assert [i for i, _, _ in got] == list(range(110))
                migrated = _kinds(live, pb.SessionEvent.KIND_MIGRATED)
                assert [(e.from_worker_id, e.worker_id) for e in migrated] == [
                    ("worker-1", "worker-2")
                ]
                assert not _kinds(live, pb.SessionEvent.KIND_RECOVERED)
                assert await _replayed(client, info.session_id, 110) == [d for _, d, _ in got]
            code, _, err = await _cli(
                "drain", "--router", mesh.addresses["router"], "worker-1", "--undo"
            )
            assert code == 0, err
            for _ in range(50):  # worker-1's own update lands in the router's table
                again = await client.create_session(DEFAULT_MODEL, seed=98, **SPEC)  # type: ignore[arg-type]
                if again.worker_id == "worker-1":
                    break
                await client.close_session(again.session_id)
                await asyncio.sleep(0.1)
            assert again.worker_id == "worker-1"


async def test_an_aborted_move_leaves_the_session_streaming_at_its_source(
    tmp_path: Path,
) -> None:
    """The target dies before the move (its lease has not run out: the router still
    lists it): the migration aborts with UNAVAILABLE and the session never stops."""
    async with Mesh(tmp_path, workers=1, worker_args=WORKER_ARGS) as mesh:
        channel, router = _router(mesh)
        async with Client(mesh.gateway) as client, channel:
            info = await client.create_session(DEFAULT_MODEL, seed=8, **SPEC)  # type: ignore[arg-type]
            live = await client.attach(info)
            play = Player(live, 80)
            await mesh.add_worker().wait_ready()
            await play.at(20)
            mesh.kill("worker-2")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await router.Migrate(
                    internal_pb2.MigrateRequest(session_id=info.session_id, to_worker_id="worker-2")
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            got = await play.task
            await live.aclose()
            assert [i for i, _, _ in got] == list(range(80))
            assert not _kinds(live, pb.SessionEvent.KIND_MIGRATED)
            assert not _kinds(live, pb.SessionEvent.KIND_RECOVERED)
            gaps = [b[2] - a[2] for a, b in itertools.pairwise(got)]
            assert max(gaps) < 1.0  # no recovery stall either
            placed = await client.get_session(info.session_id)
            assert (placed.worker_id, placed.placement_epoch) == ("worker-1", 1)
            assert "migration of session" in mesh.log("router") and "aborted" in mesh.log("router")


async def test_a_session_moves_to_another_region(tmp_path: Path) -> None:
    """``windflow migrate --region``: the session goes to the one worker in eu-west, and
    the event and GetSession say so."""
    async with Mesh(
        tmp_path, workers=2, worker_args=WORKER_ARGS, regions={"worker-2": "eu-west"}
    ) as mesh:
        async with Client(mesh.gateway) as client:
            info = await client.create_session(DEFAULT_MODEL, seed=9, region="local", **SPEC)  # type: ignore[arg-type]
            assert info.worker_id == "worker-1"
            live = await client.attach(info)
            play = Player(live, 60)
            await play.at(10)
            code, out, err = await _cli(
                "migrate",
                "--router",
                mesh.addresses["router"],
                info.session_id,
                "--region",
                "eu-west",
            )
            assert code == 0, err
            assert json.loads(out)["to_worker_id"] == "worker-2"
            got = await play.task
            await live.aclose()
            assert [i for i, _, _ in got] == list(range(60))
            (event,) = _kinds(live, pb.SessionEvent.KIND_MIGRATED)
            assert (event.worker_id, event.region) == ("worker-2", "eu-west")
            placed = await client.get_session(info.session_id)
            assert (placed.worker_id, placed.region) == ("worker-2", "eu-west")
            code, _, err = await _cli(
                "migrate", "--router", mesh.addresses["router"], info.session_id, "--region", "mars"
            )
            assert code == 1 and "INVALID_ARGUMENT" in err


@pytest.mark.parametrize("fault", ["kill target", "kill source", "pause nats"])
async def test_a_fault_mid_copy_loses_no_frame(tmp_path: Path, fault: str) -> None:
    """As the router starts a move (its ``prepare`` event on NATS), the target or the
    source is SIGKILLed, or nats-server is stopped for a second (SIGSTOP, SIGCONT): the
    control log, the events and the state copy's log reads all stall. Whatever becomes of
    the move (aborted, done, or crash recovery for a dead source), the stream gets every
    frame once, equal to Replay, and goes on."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS) as mesh:
        events = await nats.connect(mesh.nats.url)
        hit = asyncio.Event()
        info_box: list[pb.Session] = []

        async def on_prepare(_: object) -> None:
            if hit.is_set():
                return
            hit.set()
            info = info_box[0]
            other = "worker-2" if info.worker_id == "worker-1" else "worker-1"
            if fault == "kill target":
                mesh.kill(other)
            elif fault == "kill source":
                mesh.kill(info.worker_id)
            else:
                proc = mesh.nats.process
                assert proc is not None and proc.pid is not None
                os.kill(proc.pid, signal.SIGSTOP)
                await asyncio.sleep(1.0)
                os.kill(proc.pid, signal.SIGCONT)

        await events.subscribe(f"{names.SUBJECT_MIGRATION}.prepare", cb=on_prepare)
        channel, router = _router(mesh)
        try:
            async with Client(mesh.gateway) as client, channel:
                info = await client.create_session(DEFAULT_MODEL, seed=15, **SPEC)  # type: ignore[arg-type]
                info_box.append(info)
                n = len(info.model.actions)
                live = await client.attach(
                    info, controls=[(f, (f // 6) % n) for f in range(0, 140, 6)]
                )
                play = Player(live, 130)
                await play.at(20)
                outcome: object
                try:
                    outcome = await router.Migrate(
                        internal_pb2.MigrateRequest(session_id=info.session_id), timeout=20
                    )
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code()
                assert hit.is_set()
                got = await play.task
                await live.aclose()
                assert [i for i, _, _ in got] == list(range(130)), outcome
                assert not live.errors
                assert await _replayed(client, info.session_id, 130) == [d for _, d, _ in got]
                if fault == "kill target":
                    assert outcome == grpc.StatusCode.UNAVAILABLE
                    assert not _kinds(live, pb.SessionEvent.KIND_MIGRATED)
                    assert not _kinds(live, pb.SessionEvent.KIND_RECOVERED)
                elif fault == "kill source":
                    assert isinstance(outcome, grpc.StatusCode)  # the move aborted
                    assert len(_kinds(live, pb.SessionEvent.KIND_RECOVERED)) == 1
        finally:
            await events.close()


async def test_a_detached_session_migrates_and_resumes_at_its_head(tmp_path: Path) -> None:
    """A session with no stream attached moves at once (its cut-over is its head: it makes
    no frame to wait for); the next attach resumes it there on the new worker, and its
    whole history equals Replay."""
    async with Mesh(tmp_path, workers=2, worker_args=WORKER_ARGS) as mesh:
        channel, router = _router(mesh)
        async with Client(mesh.gateway) as client, channel:
            info = await client.create_session(DEFAULT_MODEL, seed=16, **SPEC)  # type: ignore[arg-type]
            n = len(info.model.actions)
            live = await client.attach(info, controls=[(f, (f // 4) % n) for f in range(0, 40, 4)])
            first = [f.frame.data async for f in live.frames(limit=40)]
            await live.aclose()
            placed = await client.get_session(info.session_id)
            head = placed.head_frame
            moved = await router.Migrate(internal_pb2.MigrateRequest(session_id=info.session_id))
            assert moved.cutover_frame == head and moved.to_worker_id != info.worker_id
            after = await client.get_session(info.session_id)
            assert (after.worker_id, after.head_frame) == (moved.to_worker_id, head)
            again = await client.attach(after, controls=[(head, 1)])
            rest = [(f.index, f.frame.data) async for f in again.frames(limit=20)]
            await again.aclose()
            assert [i for i, _ in rest] == list(range(head, head + 20))
            replayed = await _replayed(client, info.session_id, head + 20)
            assert replayed[:40] == first
            assert replayed[head:] == [d for _, d in rest]
