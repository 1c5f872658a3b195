"""The pure parts of the SDK's stream resume: gateway addresses, the controls a resumed
stream re-sends, the pause between attempts.

A stream whose gateway goes away (killed, restarting, refusing connections) ends
UNAVAILABLE. Gateways keep no session state, so the session can be attached again through
any of them; ``Session`` does that itself (``Attach.resume``, ``resume_from`` = the frame
after the last one it received), and these are the decisions it takes on the way.
"""

from __future__ import annotations

from collections.abc import Sequence

from windflow.v1 import windflow_pb2 as pb

RESUME_TIMEOUT_S = 15.0
"""How long a stream keeps trying to resume after its gateway went away: time for the
supervisor to restart a killed gateway (backoff, then imports) on a loaded machine, when
no other gateway answers."""
MAX_REMEMBERED_CONTROLS = 1024
"""Controls kept for a resume (the gateway keeps as many for a worker move). The worker
holds at most 256 future controls per session, so only ones long delivered ever go."""
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


class PendingControls:
    """The controls a stream sent (in ``Attach.controls`` or on the stream) for frames it
    has not received yet, less those the server refused: what a resumed stream re-sends.

    They must come again: the worker takes a resume back to ``resume_from``, and the
    future it made past that (with the controls it had queued) leaves its log. A refused
    control must not: the client was told it never applies (``StreamError.control``).
    """

    def __init__(self, limit: int = MAX_REMEMBERED_CONTROLS) -> None:
        self._limit = limit
        self._controls: list[pb.Control] = []

    def __len__(self) -> int:
        return len(self._controls)

    def sent(self, control: pb.Control) -> None:
        if len(self._controls) >= self._limit:
            self._controls.pop(0)  # only ever the oldest
        copy = pb.Control()
        copy.CopyFrom(control)
        self._controls.append(copy)

    def refused(self, control: pb.Control) -> None:
        """Forget the newest sent control equal to ``control`` (the server refused it)."""
        for i in range(len(self._controls) - 1, -1, -1):
            if self._controls[i] == control:
                del self._controls[i]
                return

    def received(self, frame_index: int) -> None:
        """Frame ``frame_index`` arrived: controls up to it are history."""
        if any(c.frame_index <= frame_index for c in self._controls):
            self._controls = [c for c in self._controls if c.frame_index > frame_index]

    def rewound(self) -> None:
        """The session's future restarts (KIND_REWOUND): the worker dropped what it had
        queued, so nothing sent before is re-sent."""
        self._controls.clear()

    def to_resend(self, after: int) -> list[pb.Control]:
        """The controls for frames after ``after`` (the last frame received), in the order
        they were sent (a later one for the same frame replaces an earlier one, as on
        the stream)."""
        return [c for c in self._controls if c.frame_index > after]
