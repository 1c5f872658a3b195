"""Storage retention's pure parts: which checkpoints stay, and what a fork replays."""

from __future__ import annotations

import itertools

from services.session.config import RetentionPolicy
from services.session.retention import keep
from windflow.common.durable import reach

POLICY = RetentionPolicy(recent_s=10.0, tiers=((60.0, 5.0), (float("inf"), 20.0)))
FPS = 2.0  # checkpoints every frame, below: spans are in frames of 2 per second


def test_recent_checkpoints_all_stay_older_ones_thin_by_tier() -> None:
    head = 400
    frames = list(range(0, head + 1, 2))
    kept = keep(frames, head, FPS, POLICY)
    recent = {f for f in frames if head - f <= 20}
    assert recent <= kept
    # up to 60 s (120 frames) back: one per 5 s (10 frames)
    middle = sorted(f for f in kept if 20 < head - f <= 120)
    assert all(b - a == 10 for a, b in itertools.pairwise(middle))
    # older: one per 20 s (40 frames)
    old = sorted(f for f in kept if head - f > 120)
    assert old == [f for f in range(0, 280, 40)]
    assert len(kept) < len(frames) / 3


def test_thinning_again_keeps_the_same() -> None:
    frames = list(range(0, 1001, 3))
    once = keep(frames, 1000, FPS, POLICY)
    assert keep(sorted(once), 1000, FPS, POLICY) == once


def test_reach_says_how_many_frames_a_fork_replays() -> None:
    ranges = reach([24, 48, 96], head=100, frame_ms=2.0)
    got = [(r.from_frame, r.to_frame, r.max_replay_frames) for r in ranges]
    assert got == [(0, 48, 23), (48, 96, 47), (96, 101, 4)]
    assert ranges[1].max_replay_ms == 94.0
    # no checkpoint: everything from the seed
    (only,) = reach([], head=10)
    assert (only.from_frame, only.to_frame, only.max_replay_frames) == (0, 11, 10)
