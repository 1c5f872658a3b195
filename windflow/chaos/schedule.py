"""Seeded chaos schedules: what the clients do and which faults land, as plain data.

Pure: ``for_seed(seed)`` draws one ``Schedule`` from ``random.Random(seed)`` and nothing
else, so a seed is its schedule (``describe()`` prints it for a failing run). Playing it
(``windflow.chaos.runner``) depends on timing; the script does not.

A schedule is a few sessions, each a client script of attaches, and faults:

- an attach is fresh (starts at the session's head) or a resume (starts at the frame after
  the last one this client received); it takes ``frames`` frames, sending its controls as
  it goes, then detaches for ``detach_s``;
- a control is stamped relative to the next frame when it is sent: ``valid`` (a future
  frame, sometimes so near that the worker, running ahead of the client, already made it),
  ``invalid`` (an action out of range: refused), ``late`` (a frame the client already has:
  refused), ``burst`` (``count`` controls for consecutive frames at once: past the
  worker's limit of pending controls, the rest are refused);
- a fault fires once the clients together have received ``at_frames`` frames: SIGKILL,
  SIGSTOP past the lease or SIGTERM of the worker holding one session, a restart of
  nats-server or etcd; and a schedule may run its workers with injected NATS client errors
  on control-log appends (``log_faults``, a ``WINDFLOW_FAULTS`` rule).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Any

from windflow.common import faults as injected

LEASE_TTL_S = 2
"""The workers' etcd lease TTL (``--lease-ttl``); a SIGSTOP outlasts it."""

WORKER_FAULTS = ("kill_worker", "stop_worker", "term_worker")
INFRA_FAULTS = ("restart_nats", "restart_etcd")
MOVES = ("migrate_session",)
"""Not a fault but a live migration of the session (``Router.Migrate``), racing the faults
around it as a drain or a rebalance would."""
FAULT_KINDS = WORKER_FAULTS + INFRA_FAULTS + MOVES
CONTROL_KINDS = ("valid", "invalid", "late", "burst")


@dataclass(frozen=True, slots=True)
class Control:
    """One control message (or a burst of them) of an attach."""

    after: int
    """Frames of this attach received before it is sent (0: in the Attach message)."""
    offset: int
    """Its frame: the next frame to arrive plus ``offset`` (negative: a frame received)."""
    action: int
    """The action; out of the model's range for ``invalid``. For ``late``, the player takes
    the next action instead when this one is what the past frame already shows."""
    kind: str
    count: int = 1
    """Controls in a burst (consecutive frames, actions ``action``, ``action + 1``, ...)."""


@dataclass(frozen=True, slots=True)
class Attach:
    resume: bool
    """Resume at the frame after the last one received (else: a fresh attach at the head)."""
    frames: int
    """Frames to take; the player takes more while a control it sent is still unanswered."""
    controls: tuple[Control, ...]
    detach_s: float
    """Time detached after this attach, before the next one."""


@dataclass(frozen=True, slots=True)
class SessionScript:
    model_seed: int
    attaches: tuple[Attach, ...]

    @property
    def adaptive(self) -> bool:
        """A third of the sessions run at adaptive quality: the worker may step them
        down (fewer denoising steps, logged) when a fault makes them late, and their
        frames must still equal Replay. (Derived from the seed already drawn, so the
        schedules of every seed stay as they were.)"""
        return self.model_seed % 3 == 0


@dataclass(frozen=True, slots=True)
class Fault:
    at_frames: int
    """Fires once the clients together have received this many frames."""
    kind: str
    target: int
    """For a worker fault: the session (index) whose worker it hits."""
    duration_s: float
    """SIGSTOP: how long the worker stays stopped; SIGKILL, SIGTERM: how long it stays
    down before it is started again; nats, etcd: how long the server stays down; a
    migration: 0."""
    hard: bool
    """nats, etcd: SIGKILL (else SIGTERM)."""


@dataclass(frozen=True, slots=True)
class Schedule:
    seed: int
    fps: float
    workers: int
    log_faults: str
    """``WINDFLOW_FAULTS`` of the workers ("" = none), seeded with ``seed``."""
    sessions: tuple[SessionScript, ...]
    faults: tuple[Fault, ...]

    @property
    def frames(self) -> int:
        """Frames the scripts ask for (at least)."""
        return sum(a.frames for s in self.sessions for a in s.attaches)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The schedule, one line per attach and fault, for a failing run's report."""
        lines = [
            f"schedule seed={self.seed} fps={self.fps:g} workers={self.workers} "
            f"log_faults={self.log_faults or 'none'}"
        ]
        for i, script in enumerate(self.sessions):
            for k, attach in enumerate(script.attaches):
                controls = " ".join(
                    f"{c.kind}@{c.after}{c.offset:+d}:a{c.action}"
                    + (f"x{c.count}" if c.count > 1 else "")
                    for c in attach.controls
                )
                lines.append(
                    f"  s{i} (seed {script.model_seed}"
                    f"{', adaptive' if script.adaptive else ''}) attach {k}: "
                    f"{'resume' if attach.resume else 'fresh'} {attach.frames} frames, "
                    f"detach {attach.detach_s:.2f}s; controls: {controls or '-'}"
                )
        for fault in self.faults:
            how = " hard" if fault.hard and fault.kind in INFRA_FAULTS else ""
            lines.append(
                f"  fault at {fault.at_frames} frames: {fault.kind}{how} "
                f"(session s{fault.target}), {fault.duration_s:.2f}s"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True, slots=True)
class Shape:
    """How big the schedules are drawn."""

    sessions: tuple[int, int]
    attaches: tuple[int, int]
    frames: tuple[int, int]
    """Frames per attach."""
    faults: tuple[int, int]
    fps: tuple[float, ...]
    burst: int
    """Controls in a burst; more than a session's 256 pending controls gets some refused."""
    burst_p: float
    """Chance that an attach sends a burst (it then takes at least ``burst`` frames)."""
    log_faults_p: float
    """Chance that the workers run with injected NATS client errors on log appends."""


FULL = Shape(
    sessions=(2, 6),
    attaches=(1, 3),
    frames=(40, 160),
    faults=(1, 4),
    fps=(24.0, 48.0),
    burst=300,
    burst_p=0.08,
    log_faults_p=0.3,
)
CI = Shape(
    sessions=(2, 3),
    attaches=(2, 3),
    frames=(30, 70),
    faults=(2, 3),
    fps=(48.0,),
    burst=0,
    burst_p=0.0,
    log_faults_p=0.34,
)
"""Small enough for CI: a schedule plays in about half a minute on two cores."""


def for_seed(seed: int, shape: Shape = FULL, n_actions: int = 5) -> Schedule:
    """The schedule of ``seed`` (``n_actions``: the model's action count)."""
    return generate(random.Random(seed), seed, shape, n_actions)


def generate(rng: random.Random, seed: int, shape: Shape, n_actions: int) -> Schedule:
    sessions = tuple(_session(rng, shape, n_actions) for _ in range(rng.randint(*shape.sessions)))
    total = sum(a.frames for s in sessions for a in s.attaches)
    n_faults = rng.randint(*shape.faults)
    # spread over the middle of the run, each in its own stretch: faults run one at a time
    stretch = max(1, int(total * 0.7) // n_faults)
    faults = tuple(
        _fault(rng, int(total * 0.1) + i * stretch + rng.randrange(stretch), len(sessions))
        for i in range(n_faults)
    )
    return Schedule(
        seed=seed,
        fps=rng.choice(shape.fps),
        workers=2,
        log_faults=_log_faults(rng) if rng.random() < shape.log_faults_p else "",
        sessions=sessions,
        faults=faults,
    )


def _session(rng: random.Random, shape: Shape, n_actions: int) -> SessionScript:
    attaches = []
    for k in range(rng.randint(*shape.attaches)):
        frames = rng.randint(*shape.frames)
        controls: list[Control] = []
        if k == 0:  # the first frame's action is known: a control for frame 0 in the Attach
            controls.append(Control(0, 0, rng.randrange(n_actions), "valid"))
        elif rng.random() < 0.5:
            controls.append(Control(0, rng.randint(1, 4), rng.randrange(n_actions), "valid"))
        if shape.burst and rng.random() < shape.burst_p:
            after = rng.randint(1, 5)
            frames = max(frames, after + shape.burst + 4)
            controls.append(Control(after, 1, rng.randrange(n_actions), "burst", shape.burst))
        for _ in range(rng.randint(1, max(1, frames // 12))):
            controls.append(_control(rng, frames, n_actions))
        controls.sort(key=lambda c: c.after)
        # a detach long enough for a lease to lapse now and then: faults then meet a
        # session with no client attached
        detach_s = rng.choice((0.1, 0.3, 0.8, float(LEASE_TTL_S) + 1.0))
        attaches.append(Attach(k > 0 and rng.random() < 0.5, frames, tuple(controls), detach_s))
    return SessionScript(rng.randrange(1 << 16), tuple(attaches))


def _control(rng: random.Random, frames: int, n_actions: int) -> Control:
    after = rng.randint(1, max(1, frames - 2))
    kind = rng.choices(("valid", "invalid", "late"), weights=(6, 2, 2))[0]
    if kind == "invalid":
        return Control(after, rng.randint(1, 8), n_actions + rng.randrange(3), kind)
    if kind == "late":
        return Control(after, -rng.randint(1, min(after, 4)), rng.randrange(n_actions), kind)
    # near frames race the worker running ahead of the client; far ones do not
    offset = rng.choice((0, 1, 2, rng.randint(3, 12), rng.randint(3, 40)))
    return Control(after, offset, rng.randrange(n_actions), kind)


def _fault(rng: random.Random, at_frames: int, sessions: int) -> Fault:
    kind = rng.choices(FAULT_KINDS, weights=(4, 3, 3, 2, 2, 4))[0]
    if kind == "stop_worker":
        duration = LEASE_TTL_S + rng.uniform(0.5, 2.0)
    elif kind in MOVES:
        duration = 0.0
    elif kind in WORKER_FAULTS:
        duration = rng.choice((0.0, 0.5, 2.0))
    else:
        duration = rng.uniform(0.2, 2.0)
    return Fault(at_frames, kind, rng.randrange(sessions), round(duration, 2), rng.random() < 0.5)


def _log_faults(rng: random.Random) -> str:
    """One WINDFLOW_FAULTS rule on log appends: an error now and then, or a run of them
    from one chosen call."""
    error = rng.choice(sorted(injected.ERRORS))
    if rng.random() < 0.5:
        return f"log.append={error}%{rng.choice(('0.005', '0.01', '0.02'))}"
    first = rng.randint(5, 60)
    return f"log.append={error}@{first}-{first + rng.randint(0, 2)}"
