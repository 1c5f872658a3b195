"""The chaos benchmark's CI subset: a fixed set of small seeded schedules (``windflow bench
chaos --ci``), each on a fresh stack, every client's history checked. No rule may break and
no session may be lost.

The seeds are chosen so that together they inject every fault kind: SIGKILL, SIGSTOP past
the lease and SIGTERM of a worker (which drains it by live migration), restarts of
nats-server and of etcd, a live migration racing the rest, and three kinds of injected
NATS client errors on control-log appends; with fresh and resume attaches, and
accepted, refused (out of range) and late controls. A failure names the seed, its schedule
and the command that plays it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from windflow.chaos.runner import ScheduleResult, play_schedule
from windflow.chaos.schedule import CI, for_seed

# (5, 6): kill, stop, etcd, term, ServiceUnavailableError; (13, 14): stop, nats,
# OutboundBufferLimitError; (17, 18): term (a drain by live migration), kill, stop, a live
# migration, NoStreamResponseError
SEEDS = (5, 13, 17)
SCHEDULES_PER_SEED = 2


def _failure(result: ScheduleResult) -> str:
    plan = result.schedule
    lines = [
        f"seed {plan.seed}: {len(result.violations)} violation(s), "
        f"{result.sessions_lost} session(s) lost",
        *(f"  {v}" for v in result.violations),
        plan.describe(),
        f"reproduce: windflow bench chaos --ci --seed {plan.seed} --schedules 1",
    ]
    if result.state_dir is not None:
        for path in sorted((result.state_dir / "logs").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-15:]
            lines.append(f"--- {path.name}\n" + "\n".join(line[:300] for line in tail))
    return "\n".join(lines)


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_schedules_keep_every_rule(seed: int, tmp_path: Path) -> None:
    failures = []
    for plan_seed in range(seed, seed + SCHEDULES_PER_SEED):
        result = await play_schedule(for_seed(plan_seed, CI), tmp_path / f"seed-{plan_seed}")
        assert result.frames_checked > 0
        if result.violations or result.sessions_lost:
            failures.append(_failure(result))
    assert not failures, "\n\n".join(failures)
