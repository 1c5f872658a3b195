"""The fault-injection rules (windflow/common/faults.py): parsing and when each fires."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from windflow.common import faults


def _calls(f: faults.Faults, point: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            f.hit(point)
            out.append("-")
        except Exception as exc:
            out.append(type(exc).__name__)
    return out


def test_call_ranges_fire_exactly_there() -> None:
    f = faults.Faults(
        faults.parse(
            "log.append=NoStreamResponseError@2; log.append=ConnectionClosedError@4-5;"
            "log.read=NatsTimeoutError@3+"
        )
    )
    assert _calls(f, "log.append", 6) == [
        "-",
        "NoStreamResponseError",
        "-",
        "ConnectionClosedError",
        "ConnectionClosedError",
        "-",
    ]
    assert _calls(f, "log.read", 5) == ["-", "-", "TimeoutError", "TimeoutError", "TimeoutError"]
    assert _calls(f, "checkpoint.put", 3) == ["-"] * 3
    assert f.injected == 6


def test_each_error_is_the_client_library_own() -> None:
    made = {name: make() for name, make in faults.ERRORS.items()}
    assert isinstance(made["NoStreamResponseError"], nats.js.errors.NoStreamResponseError)
    assert isinstance(made["ConnectionClosedError"], nats.errors.ConnectionClosedError)
    assert isinstance(made["OutboundBufferLimitError"], nats.errors.OutboundBufferLimitError)
    assert isinstance(made["NatsTimeoutError"], nats.errors.TimeoutError)
    unavailable = made["ServiceUnavailableError"]
    assert isinstance(unavailable, nats.js.errors.APIError) and unavailable.code == 503


def test_probabilistic_rules_are_seeded() -> None:
    def run(seed: int) -> list[str]:
        return _calls(
            faults.Faults(faults.parse("log.append=NatsTimeoutError%0.3"), seed), "log.append", 40
        )

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert 0 < run(1).count("TimeoutError") < 40


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("log.append", "bad fault rule"),
        ("log.apend=NatsTimeoutError@1", "unknown fault point"),
        ("log.append=KeyError@1", "unknown fault error"),
        ("log.append=NatsTimeoutError@0", "bad call range"),
        ("log.append=NatsTimeoutError@5-3", "bad call range"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        faults.parse(text)
