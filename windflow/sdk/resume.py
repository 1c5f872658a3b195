"""The pure parts of the SDK's stream resume: gateway addresses, the controls a resumed
stream re-sends, the pause between attempts.

A stream whose gateway goes away (killed, restarting, refusing connections) ends
UNAVAILABLE. Gateways keep no session state, so the session can be attached again through
any of them; ``Session`` does that itself (``Attach.resume``, ``resume_from`` = the frame
after the last one it received), and these are the decisions it takes on the way.
"""

from __future__ import annotations

from collections.abc import Sequence

from windflow.common.controls import MAX_REMEMBERED_CONTROLS, PendingControls

RESUME_TIMEOUT_S = 15.0
"""How long a stream keeps trying to resume after its gateway went away: time for the
supervisor to restart a killed gateway (backoff, then imports) on a loaded machine, when
no other gateway answers."""
FIRST_RETRY_DELAY_S = 0.05
MAX_RETRY_DELAY_S = 1.0
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
"""A client's channel to a gateway that went away tries to connect again at least every
second (gRPC's default backoff grows to two minutes, and a call on a channel waiting out
its backoff fails at once): a restarted gateway is found within a second of serving."""


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """Gateway addresses from one ``host:port``, a comma-separated list of them, or a
    sequence (whose items may be comma-separated too): in order, blanks and repeats
    dropped. Raises ValueError when none is left."""
    items = [address] if isinstance(address, str) else list(address)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"a gateway address must be a str, got {type(item).__name__}")
        found.extend(part.strip() for part in item.split(","))
    unique = list(dict.fromkeys(part for part in found if part))
    if not unique:
        raise ValueError(f"no gateway address in {address!r}")
    return unique


def retry_delay_s(attempt: int) -> float:
    """The pause before resume attempt ``attempt`` (0-based) of one outage: none before
    the first (it goes to the next gateway, which is likely up), then doubling from
    ``FIRST_RETRY_DELAY_S`` up to ``MAX_RETRY_DELAY_S``."""
    if attempt <= 0:
        return 0.0
    return min(MAX_RETRY_DELAY_S, FIRST_RETRY_DELAY_S * 2 ** (attempt - 1))


__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_REMEMBERED_CONTROLS",
    "RESUME_TIMEOUT_S",
    "PendingControls",
    "parse_addresses",
    "retry_delay_s",
]
