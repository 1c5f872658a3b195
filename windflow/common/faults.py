"""Injected client-side faults, for tests and the chaos benchmark (``windflow bench chaos``).

A process reads one rule list at start from ``WINDFLOW_FAULTS`` (``windflow.common.env``):

    point=Error@N          the N-th call at ``point`` raises Error (1-based)
    point=Error@N-M        calls N..M raise
    point=Error@N+         every call from the N-th on raises
    point=Error%P          each call raises with probability P (a seeded RNG: WINDFLOW_FAULTS_SEED)

Rules are separated by ``;``. A point is a named call site that calls ``faults.hit(point)``
just before its real I/O (``POINTS`` lists them). ``Error`` names one of the client
exceptions the real libraries raise there (``ERRORS``): the code under test then meets
exactly what nats-py would raise, not a stand-in. With no rules, ``hit`` is a dict lookup.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from windflow.common import env

log = logging.getLogger(__name__)

POINTS: dict[str, str] = {
    "log.append": "a control-log append (ControlLog.append, JetStream publish)",
    "log.head": "a control-log append of a HEAD entry (after log.append's own rules)",
    "log.read": "a control-log read (ControlLog.read)",
    "checkpoint.put": "a checkpoint upload to the object store (CheckpointStore.put)",
    "input.put": "an input frame's upload to the object store (InputStore stage)",
}


def _api_error(code: int, description: str) -> Callable[[], Exception]:
    def make() -> Exception:
        return nats.js.errors.ServiceUnavailableError(code=code, description=description)

    return make


ERRORS: dict[str, Callable[[], Exception]] = {
    "NoStreamResponseError": nats.js.errors.NoStreamResponseError,
    "ConnectionClosedError": nats.errors.ConnectionClosedError,
    "OutboundBufferLimitError": nats.errors.OutboundBufferLimitError,
    "NatsTimeoutError": nats.errors.TimeoutError,
    "ServiceUnavailableError": _api_error(503, "injected: JetStream temporarily unavailable"),
}

_RULE = re.compile(
    r"^(?P<point>[\w.]+)=(?P<error>\w+)"
    r"(?:@(?P<first>\d+)(?:(?P<plus>\+)|-(?P<last>\d+))?|%(?P<p>0?\.\d+|1(?:\.0*)?))$"
)


@dataclass(slots=True)
class Rule:
    point: str
    error: str
    first: int = 0
    last: int = 0
    """0: no upper bound."""
    probability: float = 0.0

    def fires(self, call: int, rng: random.Random) -> bool:
        if self.probability > 0:
            return rng.random() < self.probability
        return call >= self.first and (self.last == 0 or call <= self.last)


def parse(text: str) -> list[Rule]:
    """Rules from ``text``; ValueError naming the bad rule, point or error."""
    rules = []
    for raw in filter(None, (part.strip() for part in text.split(";"))):
        match = _RULE.match(raw)
        if match is None:
            raise ValueError(
                f"bad fault rule {raw!r}: expected point=Error@N[-M|+] or point=Error%P"
            )
        point, error = match["point"], match["error"]
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {', '.join(sorted(POINTS))}")
        if error not in ERRORS:
            raise ValueError(f"unknown fault error {error!r}; known: {', '.join(sorted(ERRORS))}")
        if match["p"] is not None:
            rules.append(Rule(point, error, probability=float(match["p"])))
        else:
            first = int(match["first"])
            last = 0 if match["plus"] else int(match["last"] or first)
            if first < 1 or (last and last < first):
                raise ValueError(f"bad call range in fault rule {raw!r}")
            rules.append(Rule(point, error, first, last))
    return rules


class Faults:
    """The rules of one process and a call counter per point."""

    def __init__(self, rules: list[Rule], seed: int = 0) -> None:
        self._rules: dict[str, list[Rule]] = {}
        for rule in rules:
            self._rules.setdefault(rule.point, []).append(rule)
        self._calls: dict[str, int] = {}
        self._rng = random.Random(seed)
        self.injected = 0

    def hit(self, point: str) -> None:
        """Count a call at ``point``; raise the configured error if a rule fires on it."""
        rules = self._rules.get(point)
        if not rules:
            return
        call = self._calls[point] = self._calls.get(point, 0) + 1
        for rule in rules:
            if rule.fires(call, self._rng):
                self.injected += 1
                log.warning("fault injected at %s (call %d): %s", point, call, rule.error)
                raise ERRORS[rule.error]()


def from_env() -> Faults:
    text = env.FAULTS.get("") or ""
    return Faults(parse(text), int(env.FAULTS_SEED.get("0") or 0))


_active = from_env()


def hit(point: str) -> None:
    """The process's fault rules at ``point`` (see the module docstring)."""
    _active.hit(point)


def install(faults: Faults) -> Faults:
    """Replace the process's rules (tests); returns the ones before."""
    global _active
    previous, _active = _active, faults
    return previous
