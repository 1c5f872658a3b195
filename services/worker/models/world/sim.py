"""The world the built-in model learns: a small, deterministic, fully visible 2-D arena.

Pure numpy and vectorized over many worlds at once (``WorldSim(seeds)`` steps one world per
seed in lockstep), so 50k frames take a couple of seconds. It is the ground truth for
training and for the quality tests.

One world (64x64 RGB):

* obstacles: ``N_OBSTACLES`` grey rectangles, placed from the world's seed, never move;
* the agent: a 12x12 red square moved ``AGENT_SPEED`` px per frame by a discrete action
  (``ACTIONS``); a move into a wall, an obstacle or a ball is refused (the agent stays);
* balls: ``N_BALLS`` 8x8 squares with their own velocities (1 px per frame on each axis);
  each axis moves separately and bounces (the velocity flips, the ball stays) when it would
  hit a wall, an obstacle, the agent or another ball.

The action given with frame t produces frame t+1. Everything is integer arithmetic, so a
seed and an action sequence determine every frame exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEIGHT = 64
WIDTH = 64
ACTIONS: tuple[str, ...] = ("noop", "up", "down", "left", "right")
# (dy, dx) per action, in the order of ACTIONS.
_MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)

AGENT_SIZE = 12
AGENT_SPEED = 2
BALL_SIZE = 8
N_BALLS = 2
N_OBSTACLES = 3
BALL_SPEEDS = np.array([-1, 1], dtype=np.int64)

BACKGROUND = np.array([18, 22, 38], dtype=np.uint8)
OBSTACLE_COLOR = np.array([128, 128, 136], dtype=np.uint8)
AGENT_COLOR = np.array([232, 64, 56], dtype=np.uint8)
BALL_COLORS = np.array([[250, 210, 60], [70, 200, 230]], dtype=np.uint8)
# Every colour a frame can hold (index 0 = background): the model's output classes.
PALETTE = np.stack([BACKGROUND, OBSTACLE_COLOR, AGENT_COLOR, *BALL_COLORS]).astype(np.uint8)
# Which palette colours belong to things that move (the agent, the balls); the background
# and the obstacles never do.
MOVING = np.array([False, False, True] + [True] * len(BALL_COLORS))


def _boxes_overlap(
    y1: np.ndarray, x1: np.ndarray, s1: int, y2: np.ndarray, x2: np.ndarray, s2: int
) -> np.ndarray:
    return (y1 < y2 + s2) & (y2 < y1 + s1) & (x1 < x2 + s2) & (x2 < x1 + s1)


class WorldSim:
    """``len(seeds)`` independent worlds stepped in lockstep; world i is fixed by seeds[i]."""

    def __init__(self, seeds: Sequence[int]) -> None:
        n = len(seeds)
        if n == 0:
            raise ValueError("WorldSim needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.agent = np.zeros((n, 2), dtype=np.int64)  # (y, x) of the top-left corner
        self.ball_pos = np.zeros((n, N_BALLS, 2), dtype=np.int64)
        self.ball_vel = np.zeros((n, N_BALLS, 2), dtype=np.int64)
        solid = np.zeros((n, HEIGHT, WIDTH), dtype=bool)
        for i, seed in enumerate(self.seeds):
            self._place(i, np.random.default_rng(seed), solid[i])
        # Summed-area table of the obstacles: a box test is four lookups.
        self._sat = np.zeros((n, HEIGHT + 1, WIDTH + 1), dtype=np.int32)
        self._sat[:, 1:, 1:] = solid.astype(np.int32).cumsum(1).cumsum(2)
        self._static = np.empty((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
        self._static[:] = BACKGROUND
        self._static[solid] = OBSTACLE_COLOR
        self._rows = np.arange(HEIGHT)
        self._cols = np.arange(WIDTH)
        self.frame_index = 0

    @property
    def n(self) -> int:
        return len(self.seeds)

    def _place(self, i: int, rng: np.random.Generator, solid: np.ndarray) -> None:
        for _ in range(N_OBSTACLES):
            h, w = (int(v) for v in rng.integers(3, 8, size=2) * 2)
            y = int(rng.integers(0, (HEIGHT - h) // 2 + 1)) * 2
            x = int(rng.integers(0, (WIDTH - w) // 2 + 1)) * 2
            solid[y : y + h, x : x + w] = True
        taken: list[tuple[int, int, int]] = []

        def free_spot(size: int) -> tuple[int, int]:
            while True:
                y = int(rng.integers(0, (HEIGHT - size) // 2 + 1)) * 2
                x = int(rng.integers(0, (WIDTH - size) // 2 + 1)) * 2
                if solid[y : y + size, x : x + size].any():
                    continue
                if any(
                    y < ty + ts and ty < y + size and x < tx + ts and tx < x + size
                    for ty, tx, ts in taken
                ):
                    continue
                taken.append((y, x, size))
                return y, x

        self.agent[i] = free_spot(AGENT_SIZE)
        for b in range(N_BALLS):
            self.ball_pos[i, b] = free_spot(BALL_SIZE)
            self.ball_vel[i, b] = rng.choice(BALL_SPEEDS, size=2)

    def _hits_obstacle(self, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
        """Whether each box (y, x, size) leaves the arena or overlaps an obstacle."""
        out = (y < 0) | (x < 0) | (y + size > HEIGHT) | (x + size > WIDTH)
        yc = np.clip(y, 0, HEIGHT - size)
        xc = np.clip(x, 0, WIDTH - size)
        idx = np.arange(self.n)
        sat = self._sat
        total = (
            sat[idx, yc + size, xc + size]
            - sat[idx, yc, xc + size]
            - sat[idx, yc + size, xc]
            + sat[idx, yc, xc]
        )
        return out | (total > 0)

    def _hits_balls(self, pos: np.ndarray, size: int, skip: int = -1) -> np.ndarray:
        """Whether each box (pos (n, 2) = (y, x), size) overlaps a ball other than ``skip``."""
        hit = np.zeros(self.n, dtype=bool)
        for b in range(N_BALLS):
            if b != skip:
                hit |= _boxes_overlap(
                    pos[:, 0],
                    pos[:, 1],
                    size,
                    self.ball_pos[:, b, 0],
                    self.ball_pos[:, b, 1],
                    BALL_SIZE,
                )
        return hit

    def step(self, actions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Apply one action per world and return the new frames, uint8 (n, 64, 64, 3)."""
        a = np.asarray(actions, dtype=np.int64)
        if a.shape != (self.n,):
            raise ValueError(f"expected {self.n} actions, got shape {a.shape}")
        if ((a < 0) | (a >= len(ACTIONS))).any():
            raise ValueError(f"actions must lie in 0..{len(ACTIONS) - 1}")
        # The agent first, blocked by the arena, obstacles and balls.
        new = self.agent + _MOVES[a] * AGENT_SPEED
        blocked = self._hits_obstacle(new[:, 0], new[:, 1], AGENT_SIZE)
        blocked |= self._hits_balls(new, AGENT_SIZE)
        self.agent = np.where(blocked[:, None], self.agent, new)
        # Then each ball, one axis at a time (x, then y), bouncing on anything solid.
        for b in range(N_BALLS):
            for axis in (1, 0):
                pos = self.ball_pos[:, b].copy()
                pos[:, axis] += self.ball_vel[:, b, axis]
                hit = self._hits_obstacle(pos[:, 0], pos[:, 1], BALL_SIZE)
                hit |= _boxes_overlap(
                    pos[:, 0], pos[:, 1], BALL_SIZE, self.agent[:, 0], self.agent[:, 1], AGENT_SIZE
                )
                hit |= self._hits_balls(pos, BALL_SIZE, skip=b)
                self.ball_vel[:, b, axis] = np.where(
                    hit, -self.ball_vel[:, b, axis], self.ball_vel[:, b, axis]
                )
                self.ball_pos[:, b] = np.where(hit[:, None], self.ball_pos[:, b], pos)
        self.frame_index += 1
        return self.render()

    def _paint(
        self, frames: np.ndarray, y: np.ndarray, x: np.ndarray, size: int, color: np.ndarray
    ) -> None:
        rows = (self._rows[None, :] >= y[:, None]) & (self._rows[None, :] < y[:, None] + size)
        cols = (self._cols[None, :] >= x[:, None]) & (self._cols[None, :] < x[:, None] + size)
        frames[rows[:, :, None] & cols[:, None, :]] = color

    def render(self) -> np.ndarray:
        """The current frames, uint8 (n, 64, 64, 3)."""
        frames = self._static.copy()
        for b in range(N_BALLS):
            self._paint(
                frames, self.ball_pos[:, b, 0], self.ball_pos[:, b, 1], BALL_SIZE, BALL_COLORS[b]
            )
        self._paint(frames, self.agent[:, 0], self.agent[:, 1], AGENT_SIZE, AGENT_COLOR)
        return frames


class StickyRandomPolicy:
    """Random actions that repeat the previous one with probability ``repeat_prob``."""

    def __init__(self, n: int, rng: np.random.Generator, repeat_prob: float = 0.8) -> None:
        self._rng = rng
        self._repeat_prob = repeat_prob
        self._last = rng.integers(0, len(ACTIONS), size=n)

    def __call__(self) -> np.ndarray:
        fresh = self._rng.integers(0, len(ACTIONS), size=self._last.shape[0])
        keep = self._rng.random(self._last.shape[0]) < self._repeat_prob
        self._last = np.where(keep, self._last, fresh)
        return self._last.copy()


def start_frames(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The two frames a session of the world ``seed`` starts from: the one at its seed and
    the one after a no-op step. One still frame cannot show the balls' velocities; two do,
    so what comes next is determined by them and the actions."""
    world = WorldSim([seed])
    before = world.render()[0]
    return before, world.step([0])[0]


def generate_episodes(
    seeds: Sequence[int],
    length: int,
    policy_seed: int,
    repeat_prob: float = 0.8,
    *,
    warm_start: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Episodes under the sticky random policy, one per world seed.

    Returns ``frames`` uint8 (n, length + 1, 64, 64, 3) and ``actions`` int64 (n, length),
    where ``actions[:, t]`` turns ``frames[:, t]`` into ``frames[:, t + 1]``. With
    ``warm_start`` the worlds take a no-op step first, so ``frames[:, 0]`` is the second of
    ``start_frames`` (the frame a model session starts from).
    """
    sim = WorldSim(seeds)
    if warm_start:
        sim.step(np.zeros(sim.n, dtype=np.int64))
    policy = StickyRandomPolicy(sim.n, np.random.default_rng(policy_seed), repeat_prob)
    frames = np.empty((sim.n, length + 1, HEIGHT, WIDTH, 3), dtype=np.uint8)
    actions = np.empty((sim.n, length), dtype=np.int64)
    frames[:, 0] = sim.render()
    for t in range(length):
        actions[:, t] = policy()
        frames[:, t + 1] = sim.step(actions[:, t])
    return frames, actions
