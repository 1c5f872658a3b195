"""How many replicas the JetStream streams and buckets Windflow creates get
(WINDFLOW_JETSTREAM_REPLICAS): one by default, three on a 3-member cluster (deploy/k8s)."""

from __future__ import annotations

import pytest

from windflow.common.durable import stream_replicas


def test_one_replica_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WINDFLOW_JETSTREAM_REPLICAS", raising=False)
    assert stream_replicas() == 1
    monkeypatch.setenv("WINDFLOW_JETSTREAM_REPLICAS", "3")
    assert stream_replicas() == 3


@pytest.mark.parametrize("bad", ["0", "6", "three", "-1"])
def test_a_bad_count_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("WINDFLOW_JETSTREAM_REPLICAS", bad)
    with pytest.raises(ValueError, match="WINDFLOW_JETSTREAM_REPLICAS"):
        stream_replicas()
