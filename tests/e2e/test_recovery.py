"""Recovery: kill -9 the worker holding a session mid-stream, or the model host process
under it, or stop the worker gracefully (SIGTERM, as an orchestrator does on a rolling
restart); the client sees every frame index exactly once, each equal to an uninterrupted
reference run."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

FRAMES = 300
KILL_AT = 100


@pytest.mark.parametrize("victim_process", ["worker", "model host", "worker, gracefully"])
async def test_worker_killed_mid_stream_no_gap_no_repeat(
    tmp_path: Path, victim_process: str
) -> None:
    mesh = Mesh(
        tmp_path,
        workers=2,
        worker_args=("--lease-ttl", "2", "--heartbeat", "0.5", "--checkpoint-every", "48"),
    )
    try:
        await mesh.start()
        async with Client(mesh.gateway) as client:
            # fixed quality: the run is compared with a separate reference run, and an
            # adaptive session may step down its denoising steps when a loaded machine makes
            # it late (the log replays whatever steps were used, but the reference would not)
            spec = {
                "seed": 77,
                "format": "rgb",
                "output_policy": "pause",
                "fps": 48.0,
                "quality": "fixed",
            }
            reference_info = await client.create_session(DEFAULT_MODEL, **spec)  # type: ignore[arg-type]
            n = len(reference_info.model.actions)
            controls = [(f, (f // 9) % n) for f in range(0, FRAMES, 9)]
            live = await client.attach(reference_info, controls=controls[:20])
            reference = []
            async for frame in live.frames(limit=FRAMES):
                reference.append(frame.frame.data)
                # the rest of the script goes in as the stream runs, well ahead of its frames
                for f, a in controls[20:]:
                    if f == frame.index + 40:
                        await live.send(action=a, frame_index=f)
            await live.aclose()

            info = await client.create_session(DEFAULT_MODEL, **spec)  # type: ignore[arg-type]
            live = await client.attach(info, controls=controls[:20])
            got: list[tuple[int, bytes]] = []
            victim = ""
            async for frame in live.frames(limit=FRAMES):
                got.append((frame.index, frame.frame.data))
                for f, a in controls[20:]:
                    if f == frame.index + 40:
                        await live.send(action=a, frame_index=f)
                if frame.index == KILL_AT:
                    victim = (await client.get_session(info.session_id)).worker_id
                    if victim_process == "worker":
                        mesh.kill(victim)
                    elif victim_process == "model host":
                        # the worker exits at once and its sessions recover elsewhere
                        mesh.kill_model_host(victim)
                    else:  # it drains: its streams end UNAVAILABLE and move, as above
                        mesh.terminate(victim)
            await live.aclose()

            assert [i for i, _ in got] == list(range(FRAMES))  # no gap, no repeat
            assert [d for _, d in got] == reference  # bit-exact across the crash
            recovered = [e for e in live.events if e.kind == pb.SessionEvent.KIND_RECOVERED]
            assert len(recovered) == 1
            after = await client.get_session(info.session_id)
            assert after.worker_id != victim and after.placement_epoch == 2
            if victim_process == "worker, gracefully":
                assert await mesh.procs[victim].wait() == 0  # a clean exit, not a crash
                assert not live.errors  # nothing refused on the way (no fenced appends)
                assert "draining: 1 attached session(s) move" in mesh.log(victim)
            if victim_process == "model host":
                assert "died" in mesh.log(victim) and "sessions recover elsewhere" in mesh.log(
                    victim
                )
    finally:
        await mesh.aclose()
