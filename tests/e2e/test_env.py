"""The Gym envs over a real mesh (windflow/env.py, docs/simulation.md), ``windflow render``
and the example policy script. The envs are synchronous: each test runs them in a thread
(``asyncio.to_thread``), so the mesh's own loop goes on meanwhile."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import av
import gymnasium
import numpy as np
import pytest
import pytest_asyncio
from gymnasium.utils.env_checker import check_env

from tests.e2e.mesh import Mesh
from windflow.cli import main as cli_main
from windflow.env import (
    WindflowEnv,
    WindflowVectorEnv,
    agent_centroid,
    arena_reached,
    arena_target_reward,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(
        tmp_path_factory.mktemp("env"), workers=1, worker_args=("--capacity", "64")
    ) as m:
        yield m


def _check_env(gateway: str) -> list[str]:
    env = gymnasium.make("windflow.env:Windflow-v0", gateway=gateway, render_mode="rgb_array")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # the unwrapped env, with its spec: the seeded determinism and render-mode
            # checks that need a spec run too
            check_env(env.unwrapped)
    finally:
        env.close()
    return [str(w.message) for w in caught if "WARN:" in str(w.message)]


async def test_the_env_passes_gymnasiums_checker(mesh: Mesh) -> None:
    complaints = await asyncio.to_thread(_check_env, mesh.gateway)
    assert complaints == []


def _single_env_behaviour(gateway: str) -> None:
    target = (48.0, 16.0)
    env = WindflowEnv(
        gateway=gateway,
        reward=arena_target_reward(target),
        terminated=lambda obs, info: info["frame_index"] >= 3,
        render_mode="rgb_array",
    )
    try:
        assert env.action_space == gymnasium.spaces.Discrete(5)
        assert env.observation_space.shape == (64, 64, 3)
        with pytest.raises(gymnasium.error.ResetNeeded):
            env.step(0)
        first, info = env.reset(seed=5)
        assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
        assert info["frame_index"] == 0 and info["seed"] == 5
        assert agent_centroid(first) is not None
        again, info2 = env.reset(seed=5)
        assert np.array_equal(first, again)  # bit-exact, in a new session
        assert info2["session_id"] != info["session_id"]
        # outside the action space: refused here ...
        for bad in (5, -1, 2.5, "up"):
            with pytest.raises(gymnasium.error.InvalidAction):
                env.step(bad)
        # ... and by the server, when the env's space is wider than the model's
        space = env.action_space
        env.action_space = gymnasium.spaces.Discrete(10)
        with pytest.raises(gymnasium.error.InvalidAction, match="refused the control"):
            env.step(9)
        env.action_space = space
        obs, reward, terminated, truncated, info = env.step(2)  # the episode goes on
        assert info == {"frame_index": 1}
        assert -1.0 <= reward <= 0.0 and not terminated and not truncated
        rendered = env.render()
        assert rendered is not None and np.array_equal(rendered, obs)
        for _ in range(2):
            obs, reward, terminated, truncated, info = env.step(2)
        assert terminated and info["frame_index"] == 3
        with pytest.raises(gymnasium.error.ResetNeeded):
            env.step(0)
        env.reset(seed=6)
        env.close()
        env.close()  # (again: nothing)
        # truncation
        short = WindflowEnv(gateway=gateway, max_episode_steps=2)
        short.reset(seed=1)
        assert short.step(0)[3] is False
        assert short.step(0)[3] is True
        with pytest.raises(gymnasium.error.ResetNeeded):
            short.step(0)
        short.close()
    finally:
        env.close()


async def test_reset_steps_refusals_termination(mesh: Mesh) -> None:
    await asyncio.to_thread(_single_env_behaviour, mesh.gateway)
    reached = arena_reached((10.0, 10.0), radius=3.0)
    frame = np.zeros((64, 64, 3), dtype=np.uint8)
    frame[4:16, 5:17] = (232, 64, 56)  # a 12x12 agent centred at (11, 10)
    assert reached(frame, {}) and not arena_reached((40.0, 40.0))(frame, {})
    assert arena_target_reward((11.0, 10.0))(frame, 0, {}) == 0.0


def _vector_matches_singles(gateway: str) -> None:
    n, steps = 8, 5
    rng = np.random.default_rng(3)
    actions = rng.integers(5, size=(steps, n))
    envs = WindflowVectorEnv(n, gateway=gateway)
    try:
        assert envs.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
        obs, infos = envs.reset(seed=100)
        assert obs.shape == (n, 64, 64, 3) and envs.observation_space.contains(obs)
        assert list(infos["seed"]) == list(range(100, 100 + n))
        seen = [obs]
        for k in range(steps):
            obs, _, terminated, truncated, infos = envs.step(actions[k])
            assert not terminated.any() and not truncated.any()
            assert list(infos["frame_index"]) == [k + 1] * n
            seen.append(obs)
        with pytest.raises(gymnasium.error.InvalidAction):
            envs.step(np.full(n, 7))
        assert sum(envs.frames_by_batch_size.values()) == n * (steps + 1)
    finally:
        envs.close()
    for i in range(n):  # each env equals a single env given its seed and actions
        env = WindflowEnv(gateway=gateway)
        try:
            single = [env.reset(seed=100 + i)[0]]
            single += [env.step(int(actions[k, i]))[0] for k in range(steps)]
        finally:
            env.close()
        for k in range(steps + 1):
            assert np.array_equal(single[k], seen[k][i]), f"env {i}, frame {k}"


async def test_the_vector_env_equals_single_envs(mesh: Mesh) -> None:
    await asyncio.to_thread(_vector_matches_singles, mesh.gateway)


def _autoreset(gateway: str) -> None:
    envs = WindflowVectorEnv(3, gateway=gateway, max_episode_steps=2, reward=lambda o, a, i: 1.0)
    try:
        envs.reset(seed=[7, 8, 9])
        first_ids = list(envs.session_ids)
        envs.step([1, 2, 3])
        _, rewards, terminated, truncated, _ = envs.step([1, 2, 3])
        assert truncated.all() and not terminated.any() and list(rewards) == [1.0] * 3
        obs, rewards, terminated, truncated, infos = envs.step([4, 4, 4])  # the resets
        assert list(rewards) == [0.0] * 3 and not terminated.any() and not truncated.any()
        assert list(infos["frame_index"]) == [0] * 3
        assert set(infos["session_id"]).isdisjoint(first_ids)
        seeds = list(infos["seed"])
        _, rewards, _, truncated, infos = envs.step([0, 0, 0])  # a new episode's step 1
        assert list(rewards) == [1.0] * 3 and not truncated.any()
        assert list(infos["frame_index"]) == [1] * 3
    finally:
        envs.close()
    # an autoreset draws its seed as a single env's unseeded reset does
    env = WindflowEnv(gateway=gateway)
    try:
        env.reset(seed=7)
        again, info = env.reset()
        assert info["seed"] == seeds[0] and np.array_equal(again, obs[0])
    finally:
        env.close()


async def test_the_vector_env_resets_an_ended_env_on_the_next_step(mesh: Mesh) -> None:
    await asyncio.to_thread(_autoreset, mesh.gateway)


async def test_render_writes_the_scripts_frames_and_names_a_bad_line(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "controls.csv"
    script.write_text('# a script\nframe,action\n0,right\n10,down\n{"frame": 20, "action": 1}\n')
    out = tmp_path / "run.mp4"
    args = ["render", "--controls", str(script), "--out", str(out), "--gateway", mesh.gateway]
    assert await asyncio.to_thread(cli_main, [*args, "--frames", "30"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 30 and summary["fps"] > 0 and summary["session_id"]
    with av.open(str(out)) as video:
        assert sum(1 for _ in video.decode(video=0)) == 30
    bad = tmp_path / "bad.csv"
    bad.write_text("0,right\n# fine so far\n5,jump\n")
    args = ["render", "--controls", str(bad), "--out", str(tmp_path / "x.mp4")]
    assert await asyncio.to_thread(cli_main, [*args, "--gateway", mesh.gateway]) == 2
    assert f"{bad}:3: unknown action 'jump'" in capsys.readouterr().err
    bad.write_text('{"frame": 0, "action": "up"}\n{"frame": 0, "action": "down"}\n')
    assert await asyncio.to_thread(cli_main, [*args]) == 2  # (before any stack starts)
    assert f"{bad}:2: frame 0 does not come after frame 0" in capsys.readouterr().err


async def test_the_example_policy_script_runs(mesh: Mesh) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "sim_policy.py"),
        "--gateway",
        mesh.gateway,
        "--smoke",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 0, text
    assert "random: mean return" in text and "greedy: mean return" in text
    assert "cem iteration 0: best" in text
