"""Restore replays batched across sessions: many sessions restored at once (a dead worker's,
recovered here in parallel) replay their logs in shared batches instead of one after the
other at batch 1.

Lifecycle: construct -> ``replay`` (concurrently, from any number of restores) -> ``aclose``.
Sessions of one model at one step count share a batch, up to the model's max batch; the
models are batch-invariant (a session's frames do not depend on its batch-mates), so a
state replayed here is bit-identical to one replayed alone (``journal.replay_steps``). A
round steps every waiting session up to ``ROUND_FRAMES`` frames in the step thread;
restores that arrive meanwhile join the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.worker.journal import Inputs, StepThread, logged_input
from services.worker.models.base import Control, SessionState, WorldModel
from windflow.v1 import internal_pb2

log = logging.getLogger(__name__)

ROUND_FRAMES = 4
"""Frames each waiting session is stepped per round (one hop to the step thread): more
amortizes the hop, fewer lets a restore that arrives meanwhile join sooner."""


@dataclass(eq=False, slots=True)
class _Job:
    model: WorldModel
    state: SessionState
    controls: Sequence[internal_pb2.LogEntry]
    target: int
    default_steps: int
    inputs: Inputs
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def step_round(
    jobs: Sequence[_Job], max_batch: Mapping[str, int], frames: int
) -> dict[int, Exception]:
    """Step each job up to ``frames`` frames toward its target, those of one model and
    step count together (blocking: the step thread). Returns the jobs (by position) whose
    step failed, with why; the others went on."""
    failed: dict[int, Exception] = {}
    for _ in range(frames):
        groups: dict[tuple[int, int], list[tuple[int, Control]]] = {}
        for i, job in enumerate(jobs):
            if i in failed or job.state.frame_index >= job.target:
                continue
            control, steps = logged_input(
                job.controls, job.state.frame_index, job.default_steps, job.inputs
            )
            groups.setdefault((id(job.model), steps), []).append((i, control))
        if not groups:
            break
        for (_, steps), members in groups.items():
            model = jobs[members[0][0]].model
            size = max(1, max_batch.get(model.info.model_id, 1))
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                try:
                    model.step([jobs[i].state for i, _ in chunk], [c for _, c in chunk], steps)
                except Exception as exc:  # those sessions' restores fail; others go on
                    failed.update((i, exc) for i, _ in chunk)
    return failed


class BatchedReplay:
    def __init__(self, in_step_thread: StepThread, max_batch: Mapping[str, int]) -> None:
        self._in_step_thread = in_step_thread
        self._max_batch = max_batch
        self._jobs: list[_Job] = []
        self._runner: asyncio.Task[None] | None = None

    async def replay(
        self,
        model: WorldModel,
        state: SessionState,
        controls: Sequence[internal_pb2.LogEntry],
        target: int,
        default_steps: int,
        inputs: Inputs,
    ) -> None:
        """Step ``state`` up to frame ``target`` under the logged ``controls`` (ordered by
        frame; their input frames in ``inputs``), in batches shared with the other
        restores under way."""
        if state.frame_index >= target:
            return
        job = _Job(model, state, controls, target, default_steps, inputs)
        self._jobs.append(job)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="batched-replay")
        await job.done

    async def _run(self) -> None:
        try:
            await self._rounds()
        except Exception as exc:  # a bug here must fail the restores, never hang them
            log.exception("batched replay failed")
            for job in self._jobs:
                if not job.done.done():
                    job.done.set_exception(exc)
            self._jobs.clear()

    async def _rounds(self) -> None:
        while self._jobs:
            # a restore whose caller gave up (its OpenSession cancelled: a deadline, a
            # client gone) is replayed no further; its state belongs to nobody now
            self._jobs = [j for j in self._jobs if not j.done.done()]
            jobs = list(self._jobs)
            if not jobs:
                return
            try:
                failed = await self._in_step_thread(
                    functools.partial(step_round, jobs, self._max_batch, ROUND_FRAMES)
                )
            except Exception as exc:  # the step thread itself failed: every job does
                failed = dict.fromkeys(range(len(jobs)), exc)
            for i, job in enumerate(jobs):
                if job.done.done():  # cancelled while its round ran
                    pass
                elif i in failed:
                    job.done.set_exception(failed[i])
                elif job.state.frame_index >= job.target:
                    job.done.set_result(None)
                else:
                    continue
                self._jobs.remove(job)
            if len(jobs) > 1:
                log.debug("replayed a round of %d restores together", len(jobs))

    async def aclose(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for job in self._jobs:
            if not job.done.done():
                job.done.cancel()
        self._jobs.clear()
