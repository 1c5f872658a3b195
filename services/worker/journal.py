"""A worker's side of durable session state: log every applied control, checkpoint, restore.

- Every frame whose control or step count differs from the previous frame's gets a
  ``LogEntry`` in the session's JetStream log; the engine releases the frame only after
  the server acknowledged that entry.
- Every ``checkpoint_every`` frames the engine snapshots the session right after its step
  (in the step thread); the upload to the object store and the catalog write run as
  tracked background tasks, at most one per session at a time.
- ``restore`` rebuilds a session's model state at any frame: the newest readable
  checkpoint at or before it (older ones if it is corrupted or of another model version;
  frame 0 from the seed as the last resort), then the log replayed up to the frame.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from services.worker.actor import SessionActor
from services.worker.controls import input_frame
from services.worker.models.base import Control, InputFrame, SessionState, WorldModel
from services.worker.stepping import Capture
from windflow.common.durable import (
    CheckpointCatalog,
    CheckpointStore,
    ControlLog,
    DeliveredHeads,
    Fenced,
    InputStore,
    StoredEntry,
    controls_by_frame,
    log_head,
)
from windflow.errors import DataLoss, FailedPrecondition, Unavailable, WindflowError
from windflow.v1 import internal_pb2
from windflow.v1 import windflow_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

APPEND_RETRY_FIRST_S = 0.05
"""First pause before a failed control-log append is retried; it doubles up to
APPEND_RETRY_MAX_S (a NATS restart takes about a second to come back)."""
APPEND_RETRY_MAX_S = 1.0


class StepThread(Protocol):
    """Runs blocking model work off the event loop (``StepEngine.in_step_thread``)."""

    def __call__(self, fn: Callable[[], T]) -> Awaitable[T]: ...


class Replayer(Protocol):
    """Replays a restored state forward under its log, in batches shared with other
    restores (``services.worker.replay.BatchedReplay``)."""

    async def replay(
        self,
        model: WorldModel,
        state: SessionState,
        controls: Sequence[internal_pb2.LogEntry],
        target: int,
        default_steps: int,
        inputs: Inputs,
    ) -> None: ...


@dataclass(slots=True)
class Restored:
    state: SessionState
    entries: list[StoredEntry]
    """The log as read (with sequences)."""
    checkpoint_frame: int


def applied_at(
    entries: Sequence[internal_pb2.LogEntry], frame: int
) -> internal_pb2.LogEntry | None:
    """The control entry in effect at ``frame`` (entries ordered by frame)."""
    current = None
    for entry in entries:
        if entry.frame_index > frame:
            break
        current = entry
    return current


Inputs = Mapping[str, InputFrame]
"""Input frames by digest: what a log's entries name (``load_inputs``)."""


def control_of(entry: internal_pb2.LogEntry | None, inputs: Inputs) -> Control:
    """The controls a log entry says are in effect (None: before the first, none)."""
    if entry is None:
        return Control()
    frame = None
    if entry.input_digest:
        frame = inputs.get(entry.input_digest)
        if frame is None:
            raise DataLoss(f"input frame {entry.input_digest[:12]} of the log was not loaded")
    return Control(
        entry.action,
        tuple(entry.axes),
        entry.prompt if entry.HasField("prompt") else None,
        tuple(entry.pose) if entry.pose else None,
        frame,
    )


def logged_input(
    entries: Sequence[internal_pb2.LogEntry],
    frame: int,
    default_steps: int,
    inputs: Inputs | None = None,
) -> tuple[Control, int]:
    """The control and denoising steps the log says made ``frame`` (entries ordered by
    frame; before the first entry: no action, ``default_steps``)."""
    entry = applied_at(entries, frame)
    if entry is None:
        return Control(), default_steps
    return control_of(entry, inputs or {}), entry.steps or default_steps


def input_digests(entries: Sequence[internal_pb2.LogEntry], from_frame: int) -> set[str]:
    """The input frames the entries (ordered by frame) have in effect at frames from
    ``from_frame`` on."""
    first = applied_at(entries, from_frame)
    return {
        e.input_digest
        for e in entries
        if e.input_digest and (e.frame_index > from_frame or e is first)
    }


def decode_input(digest: str, width: int, height: int, data: bytes) -> InputFrame:
    """An input frame from its stored raw RGB, checked against its digest."""
    if len(data) != width * height * 3:
        raise DataLoss(
            f"input frame {digest[:12]} holds {len(data)} bytes, not {width}x{height} RGB"
        )
    frame = input_frame(np.frombuffer(data, np.uint8).reshape(height, width, 3))
    if frame.digest != digest:
        raise DataLoss(f"input frame {digest[:12]} does not match its digest")
    return frame


def logged_key(control: Control, steps: int) -> tuple[object, ...]:
    """What a control-log entry records of ``control`` (the entry is due when it changes)."""
    return (
        control.action,
        control.axes,
        steps,
        control.prompt,
        control.pose,
        control.frame.digest if control.frame is not None else "",
    )


def replay_steps(
    model: WorldModel,
    state: SessionState,
    entries: Sequence[internal_pb2.LogEntry],
    to_frame: int,
    default_steps: int,
    on_frame: Callable[[int, object], None] | None = None,
    inputs: Inputs | None = None,
) -> None:
    """Step ``state`` (batch of one) up to ``to_frame`` under the logged controls (their
    input frames loaded in ``inputs``, ``Journal.load_inputs``).

    Blocking; call in the step thread. ``on_frame(index, rgb)`` sees each frame made.
    """
    while state.frame_index < to_frame:
        control, steps = logged_input(entries, state.frame_index, default_steps, inputs)
        index = state.frame_index
        rgb = model.step([state], [control], steps)
        if on_frame is not None:
            on_frame(index, rgb[0])


def ring_for(every: int, keep: int, budget_bytes: int, state_bytes: int) -> tuple[int, int]:
    """``Journal.ring``'s rule, pure: (spacing, count) of in-memory copies."""
    if every <= 0 or keep <= 0:
        return 0, 0
    if budget_bytes > 0 and state_bytes > 0:
        fit = budget_bytes // state_bytes
        if fit == 0:
            return 0, 0
        if fit < keep:
            reach = every * keep
            return max(every, -(-reach // fit)), fit
    return every, keep


class Journal:
    def __init__(
        self,
        worker_id: str,
        log_: ControlLog,
        store: CheckpointStore,
        catalog: CheckpointCatalog,
        *,
        checkpoint_every: int,
        heads: DeliveredHeads | None = None,
        memory_every: int = 2,
        memory_keep: int = 32,
        memory_budget_bytes: int = 0,
        inputs: InputStore | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.log = log_
        self.store = store
        self.inputs = inputs
        """Where input frames go (None: this worker serves no model that takes them)."""
        self.catalog = catalog
        self.checkpoint_every = checkpoint_every
        self.heads = heads
        """Where the gateways saw each session's clients leave it (None: not kept)."""
        self.memory_every = memory_every
        self.memory_keep = memory_keep
        self.memory_budget_bytes = memory_budget_bytes
        self._uploads: set[asyncio.Task[None]] = set()
        self.replayer: Replayer | None = None
        """Where restores replay their logs (batched across sessions); None: each alone
        in the step thread (``replay_steps``)."""

    # ---- the hot path ----

    def entry_for(
        self, actor: SessionActor, control: Control, steps: int
    ) -> internal_pb2.LogEntry | None:
        """The log entry frame ``actor.next_frame`` needs, or None if nothing changed. A
        new input frame starts its upload here (``append`` waits for it)."""
        key = logged_key(control, steps)
        if actor.logged == key:
            return None
        actor.logged = key
        entry = internal_pb2.LogEntry(
            kind=internal_pb2.LogEntry.KIND_CONTROL,
            frame_index=actor.next_frame,
            action=control.action,
            axes=list(control.axes),
            steps=steps,
            pose=list(control.pose or ()),
        )
        if control.prompt is not None:
            entry.prompt = control.prompt
        if control.frame is not None:
            if self.inputs is None:
                raise FailedPrecondition("this worker keeps no input frames (no InputStore)")
            rgb = control.frame.rgb
            entry.input_digest = control.frame.digest
            entry.input_height, entry.input_width = int(rgb.shape[0]), int(rgb.shape[1])
            self.inputs.stage(control.frame.digest, rgb.tobytes())
        return entry

    async def append(self, actor: SessionActor, entry: internal_pb2.LogEntry) -> None:
        """Append ``entry`` after the session's earlier appends (one at a time: each is
        fenced on the sequence of the one before; batches overlap their releases).

        A failed append is retried, with backoff, for as long as the session lives here:
        its frame is held meanwhile (the engine releases a frame only once its entry is
        acknowledged), so a log outage stalls the session instead of losing it. Every try
        carries one ``Nats-Msg-Id``: if an earlier try landed and only its ack was lost,
        the retry finds it (``ControlLog.append``) instead of reading a fence. ``Fenced``
        is final (another worker owns the session); so is the session's removal from this
        worker."""
        msg_id = f"{actor.session_id}.{actor.epoch}.{uuid.uuid4().hex}"
        delay = APPEND_RETRY_FIRST_S
        attempt = 0
        async with actor.log_lock:
            while True:
                attempt += 1
                try:
                    if entry.input_digest and self.inputs is not None:
                        await self.inputs.stored(entry.input_digest)  # named once stored
                    actor.log_seq = await self.log.append(
                        actor.session_id, entry, actor.log_seq, msg_id
                    )
                    if attempt > 1:
                        log.warning(
                            "session %s: control log append for frame %d landed after %d tries",
                            actor.session_id,
                            entry.frame_index,
                            attempt,
                            extra={"session_id": actor.session_id},
                        )
                    return
                except Fenced:
                    raise
                except Unavailable as err:
                    if actor.closed:
                        raise
                    if attempt == 1 or attempt % 10 == 0:
                        log.warning(
                            "session %s: control log append for frame %d failed (%s); "
                            "retrying, its frame held",
                            actor.session_id,
                            entry.frame_index,
                            err.message,
                            extra={"session_id": actor.session_id},
                        )
                await asyncio.sleep(delay)
                delay = min(delay * 2, APPEND_RETRY_MAX_S)

    def wants_checkpoint(self, next_frame: int) -> bool:
        every = self.checkpoint_every
        return every > 0 and next_frame > 0 and next_frame % every == 0

    def ring(self, model: WorldModel) -> tuple[int, int]:
        """(spacing in frames, copies kept) of a session's in-memory snapshots of ``model``.
        Within the memory budget per session (``memory_budget_bytes``, by the model's
        declared ``state_bytes``) fewer copies are kept, spaced wider so that they still
        reach as far back (forks replay more frames instead); (0, 0) when not one fits."""
        return ring_for(
            self.memory_every,
            self.memory_keep,
            self.memory_budget_bytes,
            int(model.info.extra.get("state_bytes", 0)),
        )

    def captures(self, actor: SessionActor, next_frame: int) -> Capture:
        """What the step that makes frame ``next_frame - 1`` keeps of the state after it:
        snapshot bytes for a durable checkpoint, a copy for the in-memory ring."""
        capture = Capture.SNAPSHOT if self.wants_checkpoint(next_frame) else Capture.NONE
        every, _ = self.ring(actor.model)
        if every > 0 and next_frame > 0 and next_frame % every == 0:
            capture |= Capture.COPY
        return capture

    def keep(
        self, actor: SessionActor, frame: int, blob: bytes | None, copy: SessionState | None
    ) -> None:
        """What a step captured of the state before ``frame``: the copy joins the ring,
        the bytes become a checkpoint."""
        if copy is not None:
            actor.remember(frame, copy, max(1, self.ring(actor.model)[1]))
        if blob is not None:
            self.checkpoint(actor, frame, blob)

    def checkpoint(self, actor: SessionActor, frame_index: int, blob: bytes) -> None:
        """Upload a snapshot taken before ``frame_index`` and record it, off the hot path."""
        if actor.checkpoint_busy:
            log.warning(
                "skipping checkpoint of %s at %d: the previous upload is still running",
                actor.session_id,
                frame_index,
            )
            return
        actor.checkpoint_busy = True
        task = asyncio.create_task(
            self._upload(actor, frame_index, blob),
            name=f"checkpoint:{actor.session_id}:{frame_index}",
        )
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _upload(self, actor: SessionActor, frame_index: int, blob: bytes) -> None:
        try:
            if not await self.save_checkpoint(actor, frame_index, blob):
                log.warning(
                    "checkpoint of %s at %d fenced off (placement moved)",
                    actor.session_id,
                    frame_index,
                )
        except Exception:
            log.exception("checkpoint of %s at %d failed", actor.session_id, frame_index)
        finally:
            actor.checkpoint_busy = False

    async def save_checkpoint(self, actor: SessionActor, frame_index: int, blob: bytes) -> bool:
        """Store a snapshot taken before ``frame_index`` and record it in the session's
        catalog; False if the placement moved off the actor's epoch meanwhile."""
        name = self.store.object_name(actor.session_id, frame_index)
        await self.store.put(name, blob)
        checkpoint = pb.Checkpoint(
            frame_index=frame_index,
            object_name=name,
            size=len(blob),
            model_version=actor.model.info.version,
        )
        return await self.catalog.add(actor.session_id, checkpoint, epoch=actor.epoch)

    async def checkpoint_frames(self, session_id: str) -> set[int]:
        return {c.frame_index for c in await self.catalog.list(session_id)}

    # ---- restore ----

    async def restore(
        self,
        session_id: str,
        model: WorldModel,
        seed: int,
        default_steps: int,
        step_thread: StepThread,
        *,
        to_frame: int | None,
        memory: Mapping[int, SessionState] | None = None,
    ) -> Restored:
        """Model state of ``session_id`` at ``to_frame`` (None: at the head its durable
        state records, ``log_head``: a session re-placed with no client comes back where
        it was, not at its newest checkpoint).

        ``memory``: in-memory snapshots by frame (copies of this session's state, or of a
        fork's parent, whose log up to ``to_frame`` is this session's; ``WorldModel.copy``),
        tried before a durable checkpoint of the same or an earlier frame. They are copied
        again, never stepped.
        """
        entries = await self.log.read(session_id)
        controls = controls_by_frame(entries)
        checkpoints = await self.catalog.list(session_id)
        if to_frame is None:
            to_frame = log_head(entries, [c.frame_index for c in checkpoints])
            if self.heads is not None:
                to_frame = max(to_frame, await self.heads.get(session_id))
        candidates: list[tuple[int, int, str | SessionState]] = [
            (c.frame_index, 0, c.object_name) for c in checkpoints
        ]
        candidates += [(f, 1, kept) for f, kept in (memory or {}).items()]
        candidates = [c for c in candidates if c[0] <= to_frame]
        state: SessionState | None = None
        base = 0
        origin = "the seed"
        for frame, _, source in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
            where = source if isinstance(source, str) else f"memory@{frame}"
            try:
                # in the step thread, never on the loop: a model host answers between
                # batches, and the loop holds it while batches of its are out
                if isinstance(source, str):
                    blob = await self.store.get(source)
                    restored = await step_thread(functools.partial(model.restore, blob))
                else:
                    restored = await step_thread(functools.partial(model.copy, source))
                base = frame
                if restored.frame_index != base:
                    raise DataLoss(
                        f"snapshot {where} holds frame {restored.frame_index}, not {base}"
                    )
                state = restored
                origin = where
                break
            except WindflowError as exc:
                log.warning(
                    "checkpoint %s of %s unusable (%s); trying an older one", where, session_id, exc
                )
                state = None
        if state is None:
            state = await step_thread(lambda: model.new_state(seed))
        target = to_frame
        if target > state.frame_index:
            await self.replay(model, state, controls, target, default_steps, step_thread)
        if state.frame_index != target:
            raise FailedPrecondition(f"could not bring {session_id} to frame {target}")
        log.info(
            "restored %s at frame %d from %s (%d frames replayed)",
            session_id,
            target,
            origin,
            target - base,
            extra={"session_id": session_id},
        )
        return Restored(state, entries, base)

    async def replay(
        self,
        model: WorldModel,
        state: SessionState,
        controls: Sequence[internal_pb2.LogEntry],
        target: int,
        default_steps: int,
        step_thread: StepThread,
    ) -> None:
        """Step ``state`` to ``target`` under ``controls``: batched with other restores
        (``replayer``) or alone in the step thread."""
        inputs = await self.load_inputs(controls, state.frame_index)
        if self.replayer is not None:
            await self.replayer.replay(model, state, controls, target, default_steps, inputs)
        else:
            await step_thread(
                lambda: replay_steps(model, state, controls, target, default_steps, inputs=inputs)
            )

    async def load_inputs(
        self, controls: Sequence[internal_pb2.LogEntry], from_frame: int
    ) -> dict[str, InputFrame]:
        """The input frames ``controls`` (ordered by frame) have in effect from
        ``from_frame`` on, by digest; ``DataLoss`` when one is missing."""
        digests = input_digests(controls, from_frame)
        if not digests:
            return {}
        if self.inputs is None:
            raise FailedPrecondition("this worker keeps no input frames (no InputStore)")
        sizes = {e.input_digest: (e.input_width, e.input_height) for e in controls}
        out: dict[str, InputFrame] = {}
        for digest in digests:
            width, height = sizes[digest]
            out[digest] = decode_input(digest, width, height, await self.inputs.get(digest))
        return out

    async def claim(self, actor: SessionActor, entries: Sequence[StoredEntry]) -> None:
        """Take over the session's log at the actor's next frame: later appends by a
        previous owner are refused (``Fenced``), and what the log holds for frames from
        there on (a future its previous owner made and no client saw) is deleted, so that
        replays, forks and later recoveries never read it. Raises ``Fenced`` when the log
        moved on since ``entries`` were read (the previous owner appended meanwhile)."""
        last = max((e.seq for e in entries), default=0)
        claim = internal_pb2.LogEntry(
            kind=internal_pb2.LogEntry.KIND_CLAIM,
            frame_index=actor.next_frame,
            worker_id=self.worker_id,
            epoch=actor.epoch,
        )
        actor.log_seq = await self.log.append(actor.session_id, claim, last)
        await self.drop_checkpoints_after(actor.session_id, actor.next_frame)
        if self.heads is not None:
            await self.heads.cap(actor.session_id, actor.next_frame)
        dropped = await self.log.truncate(actor.session_id, entries, actor.next_frame)
        if dropped:
            log.info(
                "session %s: dropped %d log entries of frames from %d on (never delivered)",
                actor.session_id,
                dropped,
                actor.next_frame,
                extra={"session_id": actor.session_id},
            )

    async def drop_checkpoints_after(self, session_id: str, frame: int) -> int:
        """Forget the session's checkpoints after ``frame`` (an abandoned future) and
        delete their objects, but those another session's catalog still names (a fork's
        inherited checkpoints). Returns how many objects went."""
        dropped = await self.catalog.drop_after(session_id, frame)
        names_ = [c.object_name for c in dropped]
        shared = await self.catalog.referenced(names_)
        for name in names_:
            if name not in shared:
                await self.store.delete(name)
        return len(names_) - len(shared)

    async def mark_head(self, actor: SessionActor) -> None:
        """Record the actor's head in its log (a HEAD entry): where a re-placed session
        comes back when no client resumes it (``log_head``)."""
        entry = internal_pb2.LogEntry(
            kind=internal_pb2.LogEntry.KIND_HEAD, frame_index=actor.next_frame
        )
        await self.append(actor, entry)

    async def sync_logged(self, actor: SessionActor, entries: Sequence[StoredEntry]) -> None:
        """Set what was last logged (and is in effect) for the actor's next frame."""
        controls = controls_by_frame(entries)
        entry = applied_at(controls, actor.next_frame - 1)
        if entry is None:
            actor.logged = None
            actor.current = Control()
        else:
            inputs = await self.load_inputs([entry], 0)
            actor.current = control_of(entry, inputs)
            actor.logged = logged_key(actor.current, entry.steps or actor.steps)

    async def aclose(self) -> None:
        for task in list(self._uploads):
            task.cancel()
        await asyncio.gather(*self._uploads, return_exceptions=True)
