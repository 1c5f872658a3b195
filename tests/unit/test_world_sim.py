"""The arena the built-in model learns: deterministic, vectorized, physically sane."""

from __future__ import annotations

import numpy as np
import pytest

from services.worker.models.world import sim


def test_same_seed_and_actions_same_frames() -> None:
    a_frames, a_actions = sim.generate_episodes([3, 4, 5], 40, policy_seed=1)
    b_frames, b_actions = sim.generate_episodes([3, 4, 5], 40, policy_seed=1)
    assert np.array_equal(a_actions, b_actions)
    assert np.array_equal(a_frames, b_frames)
    c_frames, _ = sim.generate_episodes([3, 4, 6], 40, policy_seed=1)
    assert np.array_equal(a_frames[:2], c_frames[:2]) and not np.array_equal(
        a_frames[2], c_frames[2]
    )


def test_worlds_step_independently_in_lockstep() -> None:
    together = sim.WorldSim([11, 12])
    alone = sim.WorldSim([12])
    for t in range(30):
        action = t % len(sim.ACTIONS)
        both = together.step([0, action])
        assert np.array_equal(both[1], alone.step([action])[0])


def test_agent_moves_by_action_and_balls_move_by_themselves() -> None:
    world = sim.WorldSim([21])
    before = world.agent.copy()
    balls = world.ball_pos.copy()
    world.step([sim.ACTIONS.index("noop")])
    assert np.array_equal(world.agent, before)
    assert not np.array_equal(world.ball_pos, balls)
    moved = False
    for _ in range(5):
        world.step([sim.ACTIONS.index("right")])
        moved |= bool(world.agent[0, 1] > before[0, 1])
    assert moved


def test_sticky_policy_repeats_and_bad_actions_are_refused() -> None:
    _, actions = sim.generate_episodes([1], 400, policy_seed=2, repeat_prob=0.8)
    repeats = np.mean(actions[0, 1:] == actions[0, :-1])
    assert 0.75 < repeats < 0.95
    with pytest.raises(ValueError, match="actions must lie"):
        sim.WorldSim([1]).step([7])


def test_frames_are_64x64_rgb_with_every_kind_of_thing() -> None:
    frame = sim.WorldSim([8]).render()[0]
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    colors = {tuple(c) for c in frame.reshape(-1, 3)}
    assert tuple(sim.AGENT_COLOR) in colors
    assert tuple(sim.OBSTACLE_COLOR) in colors
    assert all(tuple(c) in colors for c in sim.BALL_COLORS)


def test_the_evaluations_perfect_model_is_the_arena_from_a_sessions_start() -> None:
    """``evaluation.simulated`` (the ceiling the report gives for shuffled actions) steps the
    arenas from the frame a session starts from: with the true actions it is the truth."""
    from services.worker.models.world.evaluation import simulated

    seeds = (3, 4, 5)
    frames, actions = sim.generate_episodes(list(seeds), 6, policy_seed=1, warm_start=True)
    assert np.array_equal(simulated(seeds, actions), frames[:, 1:])
    assert not np.array_equal(simulated(seeds, np.roll(actions, 1, axis=0)), frames[:, 1:])
