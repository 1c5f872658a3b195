"""The gateway's access pieces that are pure: the creation-rate bucket, a stream's
budget and its warnings, and how refusals are counted."""

from __future__ import annotations

import pytest

from services.gateway.access import Budget, RateLimiter, _reason
from windflow.v1 import windflow_pb2 as pb


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=4.0, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(4)] == [0.0] * 4
    assert limiter.take("a") == pytest.approx(0.5)  # empty: the next in half a second
    assert limiter.take("b") == 0.0  # per tenant
    now[0] = 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert RateLimiter(rate=0.0, burst=0.0, clock=lambda: 0.0).take("a") == 0.0  # off


def test_budget_counts_frames_and_warns_once_at_80_and_95_percent() -> None:
    budget = Budget("jti", budget_s=10.0, used_s=7.0, fps=10.0)
    assert budget.frames_left == 30
    warnings = [e for _ in range(30) for e in budget.delivered(1)]
    assert [e.kind for e in warnings] == [pb.SessionEvent.KIND_BUDGET_WARNING] * 2
    assert "80%" in warnings[0].message and "95%" in warnings[1].message
    assert budget.frames_left == 0
    # past warnings are not repeated for a stream that starts past them
    late = Budget("jti", budget_s=10.0, used_s=9.6, fps=10.0)
    assert late.frames_left == 4 and late.delivered(1) == []


def test_the_ledger_ends_a_shared_budget() -> None:
    budget = Budget("jti", budget_s=10.0, used_s=2.0, fps=24.0)
    assert not budget.ledger_says(9.9)
    assert budget.ledger_says(10.0)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("token expired 3601 s ago", "expired"),
        ("token not valid for another 600 s (nbf ...)", "not yet valid"),
        ("the API key abc that minted the token is revoked", "revoked key"),
        ("token signing key 'k1' is retired", "retired signing key"),
        ("token signature is invalid (forged or altered)", "bad signature"),
        ("malformed token: not three base64url segments", "malformed"),
        ("no credential: send metadata ...", "missing or bad credential"),
    ],
)
def test_refusals_are_counted_by_reason(message: str, reason: str) -> None:
    assert _reason(message) == reason
