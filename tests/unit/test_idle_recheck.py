"""An idle worker re-times its models and corrects step costs calibrated on a busy machine
(a calibration three times too high would keep it refusing sessions by fps), and leaves
them alone while sessions run or when they still hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest

from services.worker.actor import SessionActor
from services.worker.engine import StepEngine
from services.worker.models.base import Control, SessionState
from tests.fakes import FakeWorld
from windflow.v1 import windflow_pb2 as pb

MODEL = "fake-world"


class TimedFake(FakeWorld):
    """FakeWorld whose step takes ``delay_s`` (a busy or a quiet machine)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        time.sleep(self.delay_s)
        return super().step(states, controls, steps)


async def _rechecked(engine: StepEngine, every_s: float, wait_s: float) -> bool:
    """Did the re-check report a change within ``wait_s``?"""
    changed = asyncio.Event()
    task = asyncio.create_task(engine.recheck_while_idle(every_s, changed.set))
    try:
        await asyncio.wait_for(changed.wait(), wait_s)
    except TimeoutError:
        return False
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return True


async def test_costs_calibrated_on_a_busy_machine_come_down_when_idle() -> None:
    model = TimedFake(0.03)
    engine = StepEngine({MODEL: model}, horizon_s=0.008, step_threads=1)
    try:
        await engine.calibrate(repeats=1)
        busy = engine.costs.batch_ms(MODEL, 2, 1) or 0.0
        busy_batch = engine.costs.batch_ms(MODEL, 4, 8) or 0.0
        assert busy >= 30.0
        model.delay_s = 0.005  # the other processes are done starting
        assert await _rechecked(engine, 0.02, 5.0)
        quiet = engine.costs.batch_ms(MODEL, 2, 1) or 0.0
        assert quiet < busy / 3
        # every figure of the model moved with it
        assert engine.costs.batch_ms(MODEL, 4, 8) == pytest.approx(busy_batch * quiet / busy)
        # within the tolerance nothing changes
        assert not await _rechecked(engine, 0.02, 0.3)
        # with a session on the worker its own steps measure it: no re-timing
        model.delay_s = 0.03
        state = model.new_state(1)
        spec = pb.SessionSpec(model_id=MODEL, fps=24.0, steps=2)
        engine.add(
            SessionActor(
                "s",
                spec,
                model,
                state,
                epoch=1,
                window=8,
                out_queue=4,
                max_pending_controls=8,
                now=0.0,
            )
        )
        assert not await _rechecked(engine, 0.02, 0.3)
        assert engine.costs.batch_ms(MODEL, 2, 1) == quiet
    finally:
        await engine.aclose()
