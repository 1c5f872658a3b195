"""The controls a stream sent for frames not delivered yet: what a resumed stream re-sends.

Both ends of a client's stream keep them: the SDK, for a resume through another gateway
(``windflow.sdk.resume``), and the gateway, for a new worker leg (``StreamProxy``).
"""

from __future__ import annotations

from windflow.v1 import windflow_pb2 as pb

MAX_REMEMBERED_CONTROLS = 1024
"""Controls kept for a resume. The worker holds at most 256 future controls per session,
so only ones long delivered ever go."""


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
