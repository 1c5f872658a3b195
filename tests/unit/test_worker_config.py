"""WorkerConfig refuses values the worker cannot run with, at start, with a clear message."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from services.worker.config import WorkerConfig
from windflow.cli import build_parser
from windflow.cli.serve import worker_config
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
        ("recheck_idle_s", -1.0, "recheck_idle_s"),
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


def test_serve_worker_flags_default_to_the_config_defaults() -> None:
    """The ``serve worker`` flags spell out their defaults; they must not drift from
    WorkerConfig's (every flag the CLI passes, except the addresses and the env-derived
    ones, which have no config default to agree with)."""
    args = build_parser().parse_args(
        ["serve", "worker", "--worker-id", "w", "--etcd", "e:1", "--nats", "nats://n:1"]
    )
    from_flags = worker_config(args)
    defaults = WorkerConfig(etcd="e:1", nats="nats://n:1", worker_id="w")
    skip = {"etcd", "nats", "worker_id", "listen", "advertise", "region", "step_threads"}
    for field in dataclasses.fields(WorkerConfig):
        if field.name not in skip:
            assert getattr(from_flags, field.name) == getattr(defaults, field.name), field.name
