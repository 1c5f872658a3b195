"""The client side of a chaos schedule: one session's script played through the SDK, every
frame, control and refusal recorded (``history.SessionHistory``).

An attach sends its controls as its frames arrive, stamped relative to the next frame, and
goes on past its scripted frame count until every control it sent has had the time to be
refused (``SentControl.answer_by``), so that each is known accepted or refused when it
detaches. A control's frame is unique within the session (a refusal names only the frame).
An attach the server refuses (UNAVAILABLE while a fault lasts, NOT_FOUND, ...) is tried
again for ``ATTACH_RETRY_S``; a stream that breaks after its first frame is recorded as
broken (a violation) and the script goes on with its next attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import cast

from windflow.chaos.history import (
    RUN_AHEAD,
    AttachRecord,
    Delivered,
    Refusal,
    SentControl,
    SessionHistory,
)
from windflow.chaos.schedule import Attach, Control, SessionScript
from windflow.errors import WindflowError
from windflow.sdk import Client
from windflow.sdk.client import ReceivedFrame, Session
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)

ATTACH_RETRY_S = 25.0
"""How long a client keeps trying to attach (past the gateway's 20 s recovery deadline)."""
FRAME_TIMEOUT_S = 20.0
"""A stream with no frame for this long is stalled: the client gives up on it."""
ANSWER_FRAMES = 2 * RUN_AHEAD
"""A control's refusal, if any, has arrived once a frame this far past the client's
position when it sent it has (twice the run-ahead: a control may wait in the gateway)."""
FINAL_FRAMES = 6
"""Frames the attach after the schedule takes to show that a session still plays."""


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class AttachFailed(Exception):
    """The stream ended before its first frame."""


class Progress:
    """Frames every client of the schedule received so far (faults fire on it)."""

    def __init__(self) -> None:
        self.frames = 0
        self._changed = asyncio.Event()

    def add(self) -> None:
        self.frames += 1
        self._changed.set()

    async def reach(self, frames: int) -> None:
        while self.frames < frames:
            self._changed.clear()
            await self._changed.wait()


@dataclass(slots=True)
class _Live:
    """One attach in progress: its stream, record and the controls still to send."""

    stream: Session
    record: AttachRecord
    script: Attach
    received: int = 0


class SessionPlayer:
    """Plays ``script`` for session ``info``; ``history`` is what its client saw."""

    def __init__(
        self,
        client: Client,
        info: pb.Session,
        script: SessionScript,
        name: str,
        progress: Progress,
    ) -> None:
        self.client = client
        self.info = info
        self.script = script
        self.progress = progress
        self.n_actions = len(info.model.actions)
        self.history = SessionHistory(name, info.session_id)
        self._seq = 0
        self._used: set[int] = set()

    @property
    def last_delivered(self) -> int:
        return max((f.index for a in self.history.attaches for f in a.frames), default=-1)

    async def play(self) -> None:
        """Every attach of the script, detached in between."""
        for attach in self.script.attaches:
            await self.attach(attach)
            await asyncio.sleep(attach.detach_s)

    async def final(self) -> None:
        """A fresh attach after the schedule: the session must still play."""
        record = await self.attach(Attach(False, FINAL_FRAMES, (), 0.0), final=True)
        if len(record.frames) < FINAL_FRAMES:
            why = record.end or "no frame"
            self.history.lost = f"does not play after the schedule: {why}"

    async def head(self) -> int | None:
        try:
            return int((await self.client.get_session(self.info.session_id)).head_frame)
        except WindflowError as err:
            log.info("%s: GetSession failed: %s", self.history.name, err)
            return None

    async def attach(self, script: Attach, *, final: bool = False) -> AttachRecord:
        """One attach, tried again while the server refuses it; returns its record (also
        appended to the history)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ATTACH_RETRY_S
        while True:
            record = AttachRecord(final=final)
            if script.resume:
                record.resume_from = start = self.last_delivered + 1
            else:
                record.head_before = await self.head()
                start = record.head_before if record.head_before is not None else -1
            initial = self._stamp_initial(script.controls, start, record) if start >= 0 else []
            try:
                stream = await self._open(initial, record.resume_from)
                await self._stream(_Live(stream, record, script))
            except AttachFailed as exc:
                for c in record.controls:  # refused with the attach: free their frames
                    self._used.discard(c.frame)
                if loop.time() < deadline:
                    log.info("%s: attach failed (%s); trying again", self.history.name, exc)
                    await asyncio.sleep(0.5)
                    continue
                record.controls.clear()
                record.end = f"could not attach for {ATTACH_RETRY_S:.0f} s: {exc}"
            self.history.attaches.append(record)
            return record

    async def _open(self, initial: list[tuple[int, int]], resume_from: int | None) -> Session:
        return await self.client.attach(self.info, controls=initial, resume_from=resume_from)

    async def _stream(self, live: _Live) -> None:
        stream = live.stream
        pending = [c for c in live.script.controls if c.after > 0]
        frames = cast(AsyncGenerator[ReceivedFrame, None], stream.frames())
        try:
            while not self._done(live):
                try:
                    frame = await asyncio.wait_for(anext(frames), FRAME_TIMEOUT_S)
                except StopAsyncIteration:
                    self._ended(live, f"ended normally after {live.received} frames")
                    return
                except TimeoutError:
                    self._ended(live, f"stalled: no frame for {FRAME_TIMEOUT_S:.0f} s")
                    return
                except WindflowError as err:
                    self._ended(live, f"{err.code}: {err}")
                    return
                self._record(live, frame)
                while pending and pending[0].after <= live.received:
                    await self._send(live, pending.pop(0))
        except WindflowError as err:  # a send on a stream that ended
            self._ended(live, f"{err.code}: {err}")
        finally:
            self._collect(live)
            await stream.aclose()
            with contextlib.suppress(Exception):
                await frames.aclose()

    def _done(self, live: _Live) -> bool:
        if live.received < live.script.frames:
            return False
        need = max((c.answer_by for c in live.record.controls), default=-1)
        return live.record.frames[-1].index >= need

    def _ended(self, live: _Live, why: str) -> None:
        if live.received == 0:
            raise AttachFailed(why)
        live.record.end = why

    def _record(self, live: _Live, frame: ReceivedFrame) -> None:
        live.received += 1
        self.progress.add()
        data = frame.frame
        live.record.frames.append(Delivered(frame.index, data.action, digest(data.data)))
        self._collect(live)

    def _collect(self, live: _Live) -> None:
        """Move the stream's refusals, recoveries and migrations into the record."""
        stream = live.stream
        while stream.errors:
            error = stream.errors.popleft()
            live.record.refusals.append(Refusal(error.frame_index, error.code_name, error.message))
        while stream.events:
            kind = stream.events.popleft().kind
            if kind == pb.SessionEvent.KIND_RECOVERED:
                live.record.recovered += 1
            elif kind == pb.SessionEvent.KIND_MIGRATED:
                live.record.migrated += 1

    # -- controls ----------------------------------------------------------------------

    def _stamp_initial(
        self, controls: Sequence[Control], start: int, record: AttachRecord
    ) -> list[tuple[int, int]]:
        """The controls that go in the Attach message, stamped from the first frame."""
        out = []
        for c in controls:
            if c.after == 0:
                frame = self._free_frame(start + c.offset)
                record.controls.append(self._sent(frame, c.action, c.kind, frame))
                out.append((frame, c.action))
        return out

    async def _send(self, live: _Live, control: Control) -> None:
        stream, record = live.stream, live.record
        after = stream.next_index
        answer_by = after + ANSWER_FRAMES
        if control.kind == "late":
            shown = {f.index: f.action for f in record.frames}
            frame = after + control.offset
            while frame in self._used and frame - 1 in shown:
                frame -= 1
            if frame not in shown or frame in self._used:
                return  # no past frame of this attach left to aim at
            action = control.action
            if action == shown[frame]:  # else a refusal is invisible in the frames
                action = (action + 1) % self.n_actions
            stamps = [(frame, action)]
            self._used.add(frame)
        else:
            stamps = []
            for k in range(control.count):
                frame = self._free_frame(after + control.offset + k)
                burst = control.kind == "burst"
                stamps.append(
                    (frame, (control.action + k) % self.n_actions if burst else control.action)
                )
        for frame, action in stamps:
            record.controls.append(self._sent(frame, action, control.kind, max(frame, answer_by)))
            await stream.send(action=action, frame_index=frame)

    def _free_frame(self, frame: int) -> int:
        """``frame`` or the next one no control of this session was stamped for."""
        while frame in self._used:
            frame += 1
        self._used.add(frame)
        return frame

    def _sent(self, frame: int, action: int, kind: str, answer_by: int) -> SentControl:
        self._seq += 1
        return SentControl(self._seq, frame, action, kind, answer_by)
