"""The step-cost model behind adaptive quality and fps-aware admission."""

from __future__ import annotations

import pytest

from services.worker.costs import Demand, StepCosts

MB = {"m": 8}


def costs() -> StepCosts:
    c = StepCosts()
    c.observe("m", 2, 1, 5.0)
    c.observe("m", 2, 8, 26.0)  # 3 ms per extra sample, 2 ms fixed
    return c


def test_batch_cost_interpolates_and_scales_by_steps() -> None:
    c = costs()
    assert c.batch_ms("m", 2, 1) == 5.0
    assert c.batch_ms("m", 2, 4) == pytest.approx(14.0)
    assert c.batch_ms("m", 4, 4) == pytest.approx(28.0)  # no step-4 data: x 4/2
    assert c.batch_ms("other", 2, 1) is None
    c.observe("m", 2, 1, 7.0)  # a moving average, not a replacement
    assert 5.0 < (c.batch_ms("m", 2, 1) or 0) < 7.0


def test_utilization_amortizes_batches_and_headroom_fills_to_target() -> None:
    c = costs()
    one = [Demand("m", 2, 24.0)]
    assert c.utilization(one, MB) == pytest.approx(24 * 5.0 / 1000)
    eight = [Demand("m", 2, 24.0)] * 8
    assert c.utilization(eight, MB) == pytest.approx(8 * 24 * 26.0 / 8 / 1000)
    assert c.utilization([Demand("x", 2, 1.0)], MB) is None
    room = c.fps_headroom(eight, "m", 2, 0.9, MB)
    assert room is not None
    fps, frame_ms = room
    assert frame_ms == pytest.approx(26.0 / 8)  # a 9th joins full batches of 8
    assert c.utilization([*eight, Demand("m", 2, fps)], MB) == pytest.approx(0.9)
    # nothing left past the target
    full = [Demand("m", 2, 60.0)] * 8
    assert c.fps_headroom(full, "m", 2, 0.9, MB) == (0.0, pytest.approx(26.0 / 8))


def test_rescale_moves_every_cost_of_one_model() -> None:
    c = costs()
    c.observe("n", 2, 1, 4.0)
    c.rescale("m", 0.5)  # a calibration taken on a busy machine, re-timed when idle
    assert c.batch_ms("m", 2, 1) == pytest.approx(2.5)
    assert c.batch_ms("m", 2, 8) == pytest.approx(13.0)
    assert c.batch_ms("n", 2, 1) == 4.0  # other models keep theirs
    with pytest.raises(ValueError):
        c.rescale("m", 0.0)
