"""The history checker: what the clients of a chaos schedule saw, and the rules it must keep.

Pure: plain records in, ``Violation``s out; no I/O (``windflow.chaos.runner`` records the
histories and reads Replay, the control log and GetSession after the schedule).

A session's history is its attaches in order. The rules (``check_session``):

- **frames**: within an attach every index once, contiguous; a resume attach starts at its
  ``resume_from``; a fresh one at the head GetSession gave just before it, and past every
  frame delivered before (a client never gets an index twice);
- **replay**: every delivered frame's bytes and action equal Replay of its index;
- **controls**: a control is *refused* when its attach got a StreamError for its frame;
  *accepted* when it was not and the attach went on to a frame where a refusal would have
  arrived (``SentControl.answer_by``); else (the stream broke first) *undecided*. Controls
  are sticky: frame i must show the action of the newest accepted control stamped at or
  before i (the later sent among equal stamps), or of an undecided one newer than that;
  anything else is a refused control applied or an accepted one not applied;
- **head**: after the schedule, the detached session's head is past its last delivered
  frame by at most ``head_slack`` (frames the worker made ahead of the client and dropped
  at the detach);
- **log**: no control entry at or past the head; at every delivered frame the log's
  control in effect is the frame's action; at most ``log_bound`` entries;
- **checkpoints**: none past the head, at most one per ``checkpoint_every`` frames in the
  catalog and in the object store;
- **streams and sessions**: no stream ended by the server, no session lost (each plays
  after the schedule), and the workers' actors (``check_actors``) match the open sessions.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

RUN_AHEAD = 16
"""Frames a worker may have made, or be making, past the last one its client received:
the window (8), the output queue beyond it (4), batches in flight (pipeline depth 2), and 2
for frames on the way. A refusal is queued before any frame made after it, so it reaches
the client before the frame this far past the client's position when it sent the control;
and a detached session's head is at most this far past its last delivered frame."""


@dataclass(frozen=True, slots=True)
class Delivered:
    index: int
    action: int
    digest: str
    """A digest of the frame's bytes."""


@dataclass(frozen=True, slots=True)
class SentControl:
    seq: int
    """Order of sending within the session."""
    frame: int
    action: int
    kind: str
    """What the schedule meant it to be (``schedule.CONTROL_KINDS``)."""
    answer_by: int
    """A refusal of it must have arrived before the frame with this index."""


@dataclass(frozen=True, slots=True)
class Refusal:
    frame: int
    code: str
    message: str


@dataclass(slots=True)
class AttachRecord:
    resume_from: int | None = None
    """None: a fresh attach."""
    head_before: int | None = None
    """A fresh attach: GetSession's head just before it (None: unknown)."""
    frames: list[Delivered] = field(default_factory=list)
    controls: list[SentControl] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    end: str = ""
    """How the server ended the stream ("": the client closed it)."""
    recovered: int = 0
    """KIND_RECOVERED events seen."""
    migrated: int = 0
    """KIND_MIGRATED events seen."""
    final: bool = False
    """The attach after the schedule that shows the session still plays."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    frame: int
    action: int
    claim: bool = False
    """A CLAIM entry (bookkeeping, not a control)."""


@dataclass(slots=True)
class SessionHistory:
    name: str
    session_id: str
    attaches: list[AttachRecord] = field(default_factory=list)
    lost: str = ""
    """Why the session is lost ("": it is not)."""
    head: int | None = None
    """GetSession's head after the schedule, the session detached (None: not read)."""
    final_head: int | None = None
    """GetSession's head after the final attach, when the log was read."""
    checkpoints: list[int] = field(default_factory=list)
    """Frames of the catalog's checkpoints (GetSession after the final attach)."""
    objects: int | None = None
    """Checkpoint objects of the session in the object store (None: not read)."""
    replay: dict[int, Delivered] | None = None
    """Replay's frames by index (None: not read, see ``replay_error``)."""
    replay_error: str = ""
    log: list[LogRecord] | None = None
    """The control log in append order (None: not read)."""

    @property
    def delivered(self) -> list[Delivered]:
        return [f for a in self.attaches for f in a.frames]

    def describe(self) -> str:
        """The history in short, one line per attach, for a failing run's report."""
        lines = [f"{self.name} ({self.session_id}): head {self.head}, final head {self.final_head}"]
        for k, a in enumerate(self.attaches):
            start = f"resume {a.resume_from}" if a.resume_from is not None else "fresh"
            if a.head_before is not None:
                start += f" (head {a.head_before})"
            span = f"{a.frames[0].index}..{a.frames[-1].index}" if a.frames else "no frames"
            controls = " ".join(f"{c.frame}:a{c.action}" for c in a.controls)
            refused = " ".join(f"{r.frame}:{r.code}" for r in a.refusals)
            lines.append(
                f"  attach {k}{' (final)' if a.final else ''}: {start}, frames {span}"
                + (f", {a.recovered} recovered" if a.recovered else "")
                + (f", {a.migrated} migrated" if a.migrated else "")
                + (f"; sent {controls}" if controls else "")
                + (f"; refused {refused}" if refused else "")
                + (f"; ended: {a.end}" if a.end else "")
            )
        if self.log is not None:
            entries = " ".join(
                f"{e.frame}:{'claim' if e.claim else f'a{e.action}'}" for e in self.log
            )
            lines.append(f"  log: {entries}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    """gap, repeat, replay, refused_applied, accepted_not_applied, head, log, checkpoint,
    stream, lost, actors."""
    session: str
    text: str

    def __str__(self) -> str:
        where = f" {self.session}:" if self.session else ""
        return f"[{self.kind}]{where} {self.text}"


@dataclass(frozen=True, slots=True)
class Limits:
    head_slack: int = RUN_AHEAD
    checkpoint_every: int = 48
    faults: int = 0
    """Faults the schedule injected (each may add a CLAIM and re-sent controls to a log)."""


def log_bound(accepted: int, attaches: int, faults: int) -> int:
    """Most entries a session's log may hold: one per accepted control (an entry is written
    where the control in effect changes) twice over (a recovery re-sends the controls not
    yet delivered, and the new owner logs them again), and two per attach and fault (the
    CLAIM of a new owner, a step change), plus two. A log that grows with frames, not with
    controls and faults, goes past it."""
    return 2 * accepted + 2 * (attaches + faults) + 2


def check_session(history: SessionHistory, limits: Limits = Limits()) -> list[Violation]:
    """Every rule of the module docstring that concerns one session."""
    found: list[Violation] = []
    for check in (_frames, _streams, _controls, _replay, _head, _log, _checkpoints):
        found.extend(
            Violation(kind, _label(history), text) for kind, text in check(history, limits)
        )
    return found


def check_actors(open_sessions: int, actors: int, when: str) -> list[Violation]:
    """The workers' actors (the ``sessions`` of their etcd records) against the sessions
    open: a stale actor holds a slot and memory for good."""
    if actors == open_sessions:
        return []
    text = f"{when}: the workers hold {actors} actors for {open_sessions} open sessions"
    return [Violation("actors", "", text)]


def frames_checked(history: SessionHistory) -> int:
    """Delivered frames compared with Replay."""
    if history.replay is None:
        return 0
    return sum(1 for f in history.delivered if f.index in history.replay)


# ---- the rules ----

Found = Iterable[tuple[str, str]]
_LAST = 1 << 62
"""A sequence number past every real one: bisecting (frame, _LAST) finds the controls
stamped at or before the frame."""


def _label(history: SessionHistory) -> str:
    return f"{history.name} ({history.session_id})"


def _frames(history: SessionHistory, limits: Limits) -> Found:
    last = -1  # the last frame delivered by the attaches before
    for k, attach in enumerate(history.attaches):
        frames = attach.frames
        where = f"attach {k}" + (" (final)" if attach.final else "")
        if frames:
            first = frames[0].index
            if attach.resume_from is not None and first != attach.resume_from:
                kind = "gap" if first > attach.resume_from else "repeat"
                yield kind, f"{where} resumed from {attach.resume_from} began at frame {first}"
            elif attach.resume_from is None:
                if first <= last:
                    yield "repeat", f"{where} (fresh) began at frame {first}, delivered before"
                if attach.head_before is not None and first != attach.head_before:
                    said = f"GetSession said head {attach.head_before} just before"
                    yield "head", f"{where} (fresh) began at frame {first}, {said}"
        if attach.head_before is not None and attach.resume_from is None:
            yield from _head_against(attach.head_before, last, limits, f"before {where}")
        for prev, cur in itertools.pairwise(frames):
            if cur.index == prev.index + 1:
                continue
            if cur.index > prev.index:
                yield "gap", f"{where}: frames {prev.index + 1}..{cur.index - 1} missing"
            else:
                yield "repeat", f"{where}: frame {cur.index} came again after {prev.index}"
        if frames:
            last = max(last, max(f.index for f in frames))


def _streams(history: SessionHistory, limits: Limits) -> Found:
    for k, attach in enumerate(history.attaches):
        if not attach.end or (attach.final and history.lost):  # "lost" says it
            continue
        if attach.frames:
            last = attach.frames[-1].index
            yield "stream", f"attach {k}: the server ended it after frame {last}: {attach.end}"
        else:
            yield "stream", f"attach {k} never began: {attach.end}"
    if history.lost:
        yield "lost", history.lost


@dataclass(slots=True)
class _Timeline:
    """The session's controls by stamp: (frame, seq, action) of accepted and undecided ones."""

    accepted: list[tuple[int, int, int]] = field(default_factory=list)
    undecided: list[tuple[int, int, int]] = field(default_factory=list)
    refused: list[tuple[int, int, int, str]] = field(default_factory=list)

    def allowed(self, index: int) -> set[int] | None:
        """Actions frame ``index`` may show (None: no control before it, unchecked)."""
        pos = bisect.bisect_right(self.accepted, (index, _LAST, 0))
        base = self.accepted[pos - 1] if pos else None
        out = {base[2]} if base is not None else set()
        for stamp in self.undecided:
            if stamp[0] <= index and (base is None or stamp[:2] > base[:2]):
                out.add(stamp[2])
        return out if base is not None else None

    def refused_candidate(self, index: int, action: int) -> tuple[int, int, int, str] | None:
        """A refused control that would explain ``action`` at frame ``index``."""
        pos = bisect.bisect_right(self.accepted, (index, _LAST, 0))
        base = self.accepted[pos - 1][:2] if pos else (-1, -1)
        hits = [r for r in self.refused if r[2] == action and r[0] <= index and r[:2] > base]
        return max(hits) if hits else None


def _timeline(attaches: Sequence[AttachRecord]) -> _Timeline:
    line = _Timeline()
    for attach in attaches:
        refused = {r.frame: r for r in attach.refusals}
        reached = max((f.index for f in attach.frames), default=-1)
        for c in attach.controls:
            if c.frame in refused:
                line.refused.append((c.frame, c.seq, c.action, refused[c.frame].code))
            elif reached >= c.answer_by:
                line.accepted.append((c.frame, c.seq, c.action))
            else:
                line.undecided.append((c.frame, c.seq, c.action))
    line.accepted.sort()
    line.undecided.sort()
    return line


def _controls(history: SessionHistory, limits: Limits) -> Found:
    refused_wrong: list[tuple[int, str]] = []
    missed: list[tuple[int, str]] = []
    for k, attach in enumerate(history.attaches):
        # an attach's frames answer to the controls sent up to its end: a frame delivered
        # twice (itself a violation) is not also held to controls sent after it came
        line = _timeline(history.attaches[: k + 1])
        for frame in attach.frames:
            allowed = line.allowed(frame.index)
            if allowed is None or frame.action in allowed:
                continue
            cause = line.refused_candidate(frame.index, frame.action)
            if cause is not None:
                what = (
                    f"action {frame.action} of the control for frame {cause[0]} refused {cause[3]}"
                )
                refused_wrong.append((frame.index, what))
            else:
                missed.append((frame.index, f"action {frame.action}, expected {sorted(allowed)}"))
    for first, last, what in _runs(refused_wrong):
        yield "refused_applied", f"frames {first}..{last} show the {what}"
    for first, last, what in _runs(missed):
        yield "accepted_not_applied", f"frames {first}..{last}: {what} (accepted controls)"
    known = {c.frame for a in history.attaches for c in a.controls}
    for k, attach in enumerate(history.attaches):
        for refusal in attach.refusals:
            if refusal.frame not in known:
                what = f"a {refusal.code} refusal for frame {refusal.frame}"
                yield "stream", f"attach {k}: {what}, where no control was sent: {refusal.message}"


def _replay(history: SessionHistory, limits: Limits) -> Found:
    if history.replay is None:
        if history.delivered:
            yield "replay", f"Replay failed: {history.replay_error or 'not read'}"
        return
    replay = history.replay
    absent = [(f.index, "") for f in history.delivered if f.index not in replay]
    differ = [
        (f.index, "")
        for f in history.delivered
        if f.index in replay and replay[f.index].digest != f.digest
    ]
    actions = [
        (f.index, f"{f.action} delivered, {replay[f.index].action} replayed")
        for f in history.delivered
        if f.index in replay and replay[f.index].action != f.action
    ]
    for first, last, _ in _runs(absent):
        yield "replay", f"frames {first}..{last} were delivered but Replay has none"
    for first, last, _ in _runs(differ):
        yield "replay", f"frames {first}..{last} differ from Replay"
    for first, last, what in _runs(actions):
        yield "replay", f"frames {first}..{last}: action {what}"


def _head_against(head: int, last: int, limits: Limits, when: str) -> Found:
    if head < last + 1:
        yield "head", f"head {head} {when} is behind the last delivered frame {last}"
    elif head > last + 1 + limits.head_slack:
        ahead = f"{head - last - 1} frames past the last delivered frame {last}"
        yield "head", f"head {head} {when} is {ahead} (at most {limits.head_slack})"


def _head(history: SessionHistory, limits: Limits) -> Found:
    if history.head is None:
        return
    before = [f.index for a in history.attaches if not a.final for f in a.frames]
    yield from _head_against(history.head, max(before, default=-1), limits, "after the schedule")


def _log(history: SessionHistory, limits: Limits) -> Found:
    if history.log is None:
        return
    controls = [e for e in history.log if not e.claim]
    head = history.final_head
    if head is not None:
        beyond = sorted({e.frame for e in controls if e.frame >= head})
        if beyond:
            yield "log", f"control entries at frames {_list(beyond)}, at or past the head {head}"
    # the log's control in effect at frame i: the newest entry stamped at or before i (the
    # later appended among equal stamps), as a replay applies them
    stamps = sorted((e.frame, seq, e.action) for seq, e in enumerate(controls))
    wrong = []
    for frame in history.delivered:
        pos = bisect.bisect_right(stamps, (frame.index, _LAST, 0))
        if pos and stamps[pos - 1][2] != frame.action:
            wrong.append((frame.index, f"{stamps[pos - 1][2]} logged, {frame.action} delivered"))
    for first, last, what in _runs(wrong):
        yield "log", f"frames {first}..{last}: action {what}"
    line = _timeline(history.attaches)
    accepted = len(line.accepted) + len(line.undecided)
    bound = log_bound(accepted, len(history.attaches), limits.faults)
    if len(history.log) > bound:
        yield "log", f"the log holds {len(history.log)} entries (bound {bound})"


def _checkpoints(history: SessionHistory, limits: Limits) -> Found:
    head = history.final_head
    if head is None:
        return
    beyond = [f for f in history.checkpoints if f > head]
    if beyond:
        yield "checkpoint", f"checkpoints at frames {_list(beyond)}, past the head {head}"
    if limits.checkpoint_every > 0:
        bound = head // limits.checkpoint_every + 1
        if len(history.checkpoints) > bound:
            yield "checkpoint", f"{len(history.checkpoints)} checkpoints for head {head}"
        # one object per checkpoint frame ever taken, and no frame was ever made much past
        # the head: frames the worker ran ahead are the most a rewind abandons
        bound = (head + limits.head_slack) // limits.checkpoint_every + 1
        if history.objects is not None and history.objects > bound:
            yield "checkpoint", f"{history.objects} checkpoint objects stored for head {head}"


def _runs(items: Sequence[tuple[int, str]]) -> list[tuple[int, int, str]]:
    """Consecutive indices with the same text, as (first, last, text); an index twice (a
    frame delivered twice) is one."""
    out: list[tuple[int, int, str]] = []
    for text in sorted({text for _, text in items}):
        for index in sorted({index for index, t in items if t == text}):
            if out and out[-1][2] == text and index == out[-1][1] + 1:
                out[-1] = (out[-1][0], index, text)
            else:
                out.append((index, index, text))
    return sorted(out)


def _list(frames: Sequence[int], most: int = 8) -> str:
    shown = ", ".join(str(f) for f in frames[:most])
    return shown + (f" (+{len(frames) - most} more)" if len(frames) > most else "")
