"""The reclaimer's verdict on one session a worker holds (services/session/reclaim.py)."""

from __future__ import annotations

import pytest

from services.session.config import ReclaimPolicy
from services.session.reclaim import verdict
from windflow.v1 import internal_pb2

POLICY = ReclaimPolicy(unattached_s=30.0, park_after_s=60.0)


def status(
    *, attached: bool = False, ever: bool = False, idle: float = 0.0
) -> internal_pb2.SessionStatus:
    return internal_pb2.SessionStatus(
        session_id="s", attached=attached, ever_attached=ever, idle_s=idle
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"idle": 29.9}, None),
        ({"idle": 30.0}, "close"),  # never attached within the limit
        ({"ever": True, "idle": 45.0}, None),  # detached, not long enough
        ({"ever": True, "idle": 60.0}, "park"),
        ({"attached": True, "ever": True}, None),
        ({"attached": True, "ever": True, "idle": 999.0}, None),  # attached wins
    ],
)
def test_verdict(kwargs: dict[str, float | bool], expected: str | None) -> None:
    assert verdict(status(**kwargs), POLICY) == expected  # type: ignore[arg-type]


def test_a_rule_at_zero_is_off() -> None:
    off = ReclaimPolicy(unattached_s=0.0, park_after_s=0.0)
    assert verdict(status(idle=1e9), off) is None
    assert verdict(status(ever=True, idle=1e9), off) is None
    assert not ReclaimPolicy(unattached_s=0, park_after_s=0).enabled
    assert not ReclaimPolicy(every_s=0).enabled
