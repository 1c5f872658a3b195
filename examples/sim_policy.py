"""Policies on the built-in arena over the mesh: a greedy controller against random
actions, and a small cross-entropy search over open-loop action sequences.

The task: bring the red agent's centroid to a target (``--target X,Y``, arena pixels).
Reward per step: ``windflow.env.arena_target_reward`` (minus the distance to the target
over the arena's diagonal, in [-1, 0]); an episode ends when the agent is within 4 px of
the target (``arena_reached``) or after ``--horizon`` steps.

1. Evaluation with ``WindflowVectorEnv`` (one lockstep session per env, stepped together):
   ``--episodes`` episodes (seeds ``--seed`` ...) of each policy. *random*: uniform
   actions. *greedy*: move along the axis where the agent is furthest from the target
   (noop within 2 px); it knows nothing of obstacles or balls and stops where they block
   it. Prints each policy's mean return, its spread and how many episodes reached the
   target.
2. Cross-entropy method (``--cem-iters`` > 0): from frame 1 of one session (seed
   ``--seed``), ``--population`` open-loop action sequences of ``--horizon`` steps are run
   as branches of that state (``client.rollouts``: ``fork_many``, every branch from the
   same frame, bit for bit), scored by their summed reward; each step's action
   distribution is refitted to the best third. Prints the best and mean score of each
   iteration. It searches the model's world: what it finds is a plan in that world.

    .venv/bin/python examples/sim_policy.py --gateway 127.0.0.1:PORT [--token T]
    .venv/bin/python examples/sim_policy.py            # starts a stack of its own
    .venv/bin/python examples/sim_policy.py --smoke    # a few short episodes (tests)

Nothing is claimed beyond the printed figures: one target, a handful of seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from windflow.env import (
    WindflowVectorEnv,
    agent_centroid,
    arena_reached,
    arena_target_reward,
    run_sync,
)
from windflow.errors import ResourceExhausted
from windflow.sdk import Client

ACTIONS = ("noop", "up", "down", "left", "right")
NOOP, UP, DOWN, LEFT, RIGHT = range(5)


def greedy(obs: np.ndarray, target: tuple[float, float]) -> int:
    """Toward the target along the axis with the larger gap (noop within 2 px)."""
    at = agent_centroid(obs)
    if at is None:
        return NOOP
    dx, dy = target[0] - at[0], target[1] - at[1]
    if max(abs(dx), abs(dy)) < 2:
        return NOOP
    if abs(dx) >= abs(dy):
        return RIGHT if dx > 0 else LEFT
    return DOWN if dy > 0 else UP


def evaluate(
    policy: str, args: argparse.Namespace, gateway: str, token: str | None
) -> list[tuple[float, bool]]:
    """(return, reached) of each of ``args.episodes`` episodes of ``policy``."""
    target = args.target
    envs = WindflowVectorEnv(
        args.episodes,
        gateway=gateway,
        token=token,
        reward=arena_target_reward(target),
        terminated=arena_reached(target),
        max_episode_steps=args.horizon,
    )
    rng = np.random.default_rng(args.seed)
    try:
        obs, _ = envs.reset(seed=args.seed)
        returns = np.zeros(args.episodes)
        reached = np.zeros(args.episodes, dtype=bool)
        done = np.zeros(args.episodes, dtype=bool)
        while not done.all():
            if policy == "greedy":
                actions = np.array([greedy(o, target) for o in obs])
            else:
                actions = rng.integers(len(ACTIONS), size=args.episodes)
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            # (an env that ended is reset by the next step: its later results are ignored)
            returns += np.where(done, 0.0, rewards)
            reached |= ~done & terminated
            done |= terminated | truncated
    finally:
        envs.close()
    return list(zip(returns.tolist(), reached.tolist(), strict=True))


async def cem(args: argparse.Namespace, gateway: str, token: str | None) -> list[dict[str, Any]]:
    """Cross-entropy search over open-loop sequences from frame 1 of one session."""
    reward = arena_target_reward(args.target)
    rng = np.random.default_rng(args.seed)
    probs = np.full((args.horizon, len(ACTIONS)), 1.0 / len(ACTIONS))
    history: list[dict[str, Any]] = []
    async with Client(gateway, token=token) as client:
        info = await client.create_session(
            "windflow-world", seed=args.seed, format="rgb", session_class="lockstep"
        )
        live = await client.attach(info, controls=[(0, NOOP)])
        try:
            [frame0] = [f async for f in live.frames(limit=1)]
        finally:
            await live.aclose()
        try:
            for it in range(args.cem_iters):
                plans = [
                    [int(rng.choice(len(ACTIONS), p=p)) for p in probs]
                    for _ in range(args.population)
                ]
                t0 = time.perf_counter()
                results = await _rollouts(client, info.session_id, plans)
                took = time.perf_counter() - t0
                scores = [
                    sum(reward(f.rgb(), a, {}) for f, a in zip(frames, plan, strict=True))
                    for frames, plan in zip(results, plans, strict=True)
                ]
                elite = [plans[i] for i in np.argsort(scores)[::-1][: max(1, len(plans) // 3)]]
                counts = np.zeros_like(probs)
                for plan in elite:
                    counts[np.arange(args.horizon), plan] += 1
                probs = 0.7 * counts / len(elite) + 0.3 * probs  # smoothed refit
                history.append(
                    {
                        "iteration": it,
                        "best": max(scores),
                        "mean": statistics.fmean(scores),
                        "frames": sum(len(r) for r in results),
                        "seconds": took,
                    }
                )
        finally:
            await client.close_session(info.session_id)
    start = agent_centroid(frame0.rgb())
    print(f"cem: agent starts at {start}, target {args.target}", flush=True)
    return history


async def _rollouts(client: Client, session_id: str, plans: list[list[int]]) -> Any:
    """``client.rollouts`` from frame 1, retried a while when the router refuses the
    branches for fps headroom (it counts a lockstep session's fps against a worker's
    headroom: docs/simulation.md, "Open problems")."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return await client.rollouts(session_id, 1, plans)
        except ResourceExhausted as err:
            if "can meet" not in err.message or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _target(text: str) -> tuple[float, float]:
    x, y = (float(v) for v in text.split(","))
    return x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default=None, help="host:port (none: start a stack)")
    parser.add_argument("--token", default=None, help="session token (default $WINDFLOW_TOKEN)")
    parser.add_argument("--target", type=_target, default=(48.0, 16.0), help="X,Y in pixels")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=60, help="steps per episode / plan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cem-iters", type=int, default=4, help="0: no search")
    parser.add_argument(
        "--population",
        type=int,
        default=6,
        help="plans per CEM iteration (more may be refused for now: docs/simulation.md)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run (the test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.episodes, args.horizon, args.cem_iters, args.population = 2, 6, 1, 2
    with _gateway(args) as (gateway, token):
        for policy in ("random", "greedy"):
            t0 = time.perf_counter()
            outcomes = evaluate(policy, args, gateway, token)
            returns = [r for r, _ in outcomes]
            spread = statistics.pstdev(returns) if len(returns) > 1 else 0.0
            print(
                f"{policy:>6}: mean return {statistics.fmean(returns):.3f} (sd {spread:.3f}) "
                f"over {len(returns)} episodes of <= {args.horizon} steps; reached the target "
                f"in {sum(r for _, r in outcomes)}; {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        if args.cem_iters > 0:
            for row in run_sync(cem(args, gateway, token)):
                print(
                    f"cem iteration {row['iteration']}: best {row['best']:.3f}, mean "
                    f"{row['mean']:.3f} over {args.population} plans of {args.horizon} steps "
                    f"({row['frames']} frames in {row['seconds']:.2f} s)",
                    flush=True,
                )
    return 0


@contextlib.contextmanager
def _gateway(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    """The given gateway, or a stack of this process's own (one worker, on the env loop)."""
    if args.gateway:
        yield args.gateway, args.token
        return
    from windflow.infra import Stack, StackConfig

    state_dir = Path(tempfile.mkdtemp(prefix="windflow-sim-policy-"))
    config = StackConfig(
        state_dir=state_dir,
        workers=1,
        bridge=False,
        worker_args=("--capacity", "64"),
    )
    stack = Stack(config)
    try:
        run_sync(stack.start())
    except BaseException:
        run_sync(stack.aclose())
        raise
    print(f"stack ready, gateway {stack.gateway_address}", file=sys.stderr, flush=True)
    try:
        yield stack.gateway_address, stack.token
    finally:
        run_sync(stack.aclose())
    shutil.rmtree(state_dir, ignore_errors=True)  # (kept, with its logs, on a failure)


if __name__ == "__main__":
    sys.exit(main())
