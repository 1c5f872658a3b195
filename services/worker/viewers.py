"""The streams watching one session: one controller and any number of spectators.

A session's frames are made once. The controller's stream takes them from the actor's own
queue, under its flow-control window (``SessionActor.out``), and its acks pace the
session. Each spectator has a queue of its own that the actor fans every frame and event
into as it is made (``SessionActor.push``): a copy of the message, not a second frame. A
spectator's queue holds at most ``SPECTATOR_FRAMES`` frames; a spectator that reads more
slowly than the session makes frames loses its oldest ones (counted in its frames'
``dropped_total``), so it costs only itself: it never holds the session or the other
viewers back. Its acks keep at most ``window`` of its frames in flight, as a controller's
do, but they pace only its own stream: a reader that falls behind finds the newest frames
waiting, not a transport buffer full of old ones. Events are never dropped.

The controller role moves by a ``Handover``: the controller names a spectator, which
becomes the controller while the sender becomes a spectator; a spectator takes the role
while no controller is attached. Each viewer is told with ``KIND_ROLE_CHANGED`` (its own
role, the controller's id, the spectators' count).
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from dataclasses import dataclass, field

from services.worker.messages import event
from windflow.v1 import windflow_pb2 as pb

SPECTATOR_FRAMES = 2
"""Frames a spectator's queue holds: newest first beyond that."""
SPECTATOR_WINDOW = 2
"""A spectator's flow-control window when its Attach names none: what it sees is at most
this many frames plus its queue behind the session."""


def new_viewer_id() -> str:
    return "v" + secrets.token_hex(4)


@dataclass(slots=True)
class Viewer:
    """One stream attached to a session, in either role."""

    viewer_id: str
    role: pb.Role.ValueType
    window: int = 0
    tenant: str = ""
    token_id: str = ""
    budget_frames: int | None = None
    """Frames its token may still have made (None: no cap); applies while it controls."""
    out: collections.deque[pb.ServerMessage] = field(default_factory=collections.deque)
    """A spectator's queue (the controller's is the actor's)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when its queue gains a message, its role changes or the session ends."""
    dropped: int = 0
    """Frames dropped from its queue because it read too slowly."""
    last_sent: int = -1
    last_acked: int = -1
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever a message leaves its queue for its stream (``take``)."""
    _frames: int = 0

    @property
    def spectating(self) -> bool:
        return self.role == pb.ROLE_SPECTATOR

    def start_at(self, frame: int, window: int) -> None:
        """Its flow control starts over with ``frame`` the next (it begins to spectate)."""
        self.window = window
        self.last_sent = self.last_acked = frame - 1

    def ack(self, frame_index: int) -> None:
        if frame_index > self.last_acked:
            self.last_acked = min(frame_index, self.last_sent)
            self.wake.set()

    def can_send(self) -> bool:
        if not self.out:
            return False
        if not self.out[0].HasField("frame"):
            return True
        return self.last_sent - self.last_acked < self.window

    def put(self, message: pb.ServerMessage) -> None:
        """Queue a copy of ``message`` (a frame, an event, an error for this viewer)."""
        copy = pb.ServerMessage()
        copy.CopyFrom(message)
        if copy.HasField("frame"):
            while self._frames >= SPECTATOR_FRAMES:
                for i, queued in enumerate(self.out):
                    if queued.HasField("frame"):
                        del self.out[i]
                        break
                self._frames -= 1
                self.dropped += 1
            self._frames += 1
            copy.frame.dropped_total = self.dropped
        elif copy.event.kind == pb.SessionEvent.KIND_REWOUND:
            self.last_sent = self.last_acked = copy.event.frame_index - 1  # a new future
        self.out.append(copy)
        self.wake.set()

    def take(self) -> pb.ServerMessage | None:
        """The next message it may be sent now (within its window), if any."""
        if not self.can_send():
            return None
        self.taken.set()
        message = self.out.popleft()
        if message.HasField("frame"):
            self._frames -= 1
            self.last_sent = message.frame.frame_index
        return message


def role_event(
    viewer: Viewer, controller_id: str, spectators: int, frame_index: int, why: str
) -> pb.ServerMessage:
    """``KIND_ROLE_CHANGED`` as ``viewer`` gets it: its own role, who controls now."""
    message = event(pb.SessionEvent.KIND_ROLE_CHANGED, why, frame_index)
    message.event.viewer_id = controller_id
    message.event.role = viewer.role
    message.event.spectators = spectators
    return message
