"""WorkerConfig refuses values the worker cannot run with, at start, with a clear message."""

from __future__ import annotations

from typing import Any

import pytest

from services.worker.config import WorkerConfig
from windflow.errors import InvalidArgument


def _config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(
        etcd="127.0.0.1:2379", nats="nats://127.0.0.1:4222", worker_id="w", **overrides
    )


def test_defaults_are_valid() -> None:
    config = _config()
    assert config.memory_snapshot_every >= 0 and config.memory_snapshots >= 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("memory_snapshot_every", -1, "memory_snapshot_every"),
        ("memory_snapshots", 0, "memory_snapshots"),
        ("memory_snapshot_mb", -1.0, "memory_snapshot_mb"),
        ("pipeline_depth", 0, "pipeline_depth"),
        ("pipeline_depth", 5, "pipeline_depth"),
        ("capacity", 0, "capacity"),
        ("window", 65, "window"),
    ],
)
def test_bad_values_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _config(**{field: value})


def test_no_in_memory_snapshots_is_allowed() -> None:
    assert _config(memory_snapshot_every=0).memory_snapshot_every == 0
