"""How many in-memory copies of a session a worker keeps, and how far apart (pure rule),
and the state size the models declare for it."""

from __future__ import annotations

import pytest

from services.worker.journal import ring_for
from services.worker.models.wan.factory import load_tiny

MB = 2**20


@pytest.mark.parametrize(
    ("every", "keep", "budget", "size", "expected"),
    [
        (2, 32, 16 * MB, 150_000, (2, 32)),  # the built-in model: all 32 fit
        (2, 32, 0, 10 * MB, (2, 32)),  # no budget
        (2, 32, 16 * MB, 0, (2, 32)),  # a model that declares no size
        (2, 32, 16 * MB, 2 * MB, (8, 8)),  # 8 fit: spaced to reach 64 frames back still
        (2, 32, 16 * MB, 5 * MB, (22, 3)),  # 3 fit: ceil(64 / 3)
        (2, 32, 16 * MB, 4 * 2**30, (0, 0)),  # a large model's KV cache: none
        (0, 32, 16 * MB, 150_000, (0, 0)),  # switched off
    ],
)
def test_ring_fits_the_budget_and_keeps_its_reach(
    every: int, keep: int, budget: int, size: int, expected: tuple[int, int]
) -> None:
    assert ring_for(every, keep, budget, size) == expected


def test_the_wan_adapter_declares_its_kv_cache_size() -> None:
    model = load_tiny(seed=0)
    cache = model.pipeline.empty_cache()
    real = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert model.info.extra["state_bytes"] == real
